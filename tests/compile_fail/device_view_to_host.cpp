// Must NOT compile: device memory handed to a host residual function. Views carry their memory
// space, and a DeviceView does not convert to a host view; the static_assert in core/tensor.hpp
// names the mistake. With -DDR2NET_SAME_SPACE the same calls use host views and must compile
// (so the failure is the space, not something else). Needs no CUDA toolkit: DeviceSpace and
// DeviceView are part of the core.
#include <vector>

#include "dr2net/dr2net.hpp"
#include "dr2net/modules/vit.hpp"

int main() {
  using namespace dr2net;
  HostContext ctx;
  VitAttention<float> attn(VitAttentionConfig{8, 2});
  const Shape shape{1, 3, 8};
  std::vector<float> in(24), out(24), scratch(attn.saved_elements(shape));
  const ModuleCall<HostContext> call{ctx};
#ifdef DR2NET_SAME_SPACE
  attn.forward(call, ConstView<float>(in.data(), shape), TensorView<float>(out.data(), shape),
               TensorView<float>(scratch.data(), Shape{static_cast<std::int64_t>(scratch.size())}));
#else
  // As if these pointers came from a DeviceBuffer (DeviceBuffer::view returns a DeviceView).
  attn.forward(call, ConstDeviceView<float>(in.data(), shape), DeviceView<float>(out.data(), shape),
               DeviceView<float>(scratch.data(), Shape{static_cast<std::int64_t>(scratch.size())}));
#endif
  return 0;
}
