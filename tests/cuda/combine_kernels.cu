// Instantiates the elementwise kernels of every fused combine pass, for every precision the
// block runs them in, so that check_stack_frames.cmake can read ptxas's resource report of
// each one. It is compiled, never run: nothing here launches unless the function is called.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "dr2net/backend/cuda/cuda.cuh"
#include "dr2net/block/combine.hpp"

namespace dr2net::testing {

//! The combine passes of streams S, compute C and accumulate A (the pointers are never used).
template <class S, class C, class A>
void instantiate_combines(CudaContext& ctx, S* s, C* c) {
  for_each_index(ctx, 1, ForwardCombine<S, C, A>{s, s, c, A(1), A(1)});
  for_each_index(ctx, 1, ForwardPreCombine<S, A>{s, s, A(1), A(1)});
  for_each_index(ctx, 1, InverseCombine<S, C, A>{s, s, c, A(1), A(1)});
  for_each_index(ctx, 1, BackwardCombine<S, C, A, true>{s, s, c, s, s, c, A(1), A(1)});
  for_each_index(ctx, 1, BackwardCombine<S, C, A, false>{s, s, c, nullptr, nullptr, nullptr, A(1), A(1)});
  for_each_index(ctx, 1, ConvertCopy<S, C>{c, s});
  for_each_index(ctx, 1, ConvertCopy<C, S>{s, c});
  for_each_index(ctx, 1, ScaledSum<S, A>{s, s, s, A(1)});
  for_each_index(ctx, 1, Scale<S, A>{s, s, A(1)});
}

//! Every policy of precision/precision.hpp and backend/cuda/precision.cuh with floating streams.
void instantiate_all_combines(CudaContext& ctx, void* p) {
  instantiate_combines<float, float, float>(ctx, static_cast<float*>(p), static_cast<float*>(p));
  instantiate_combines<double, double, double>(ctx, static_cast<double*>(p), static_cast<double*>(p));
  instantiate_combines<double, float, double>(ctx, static_cast<double*>(p), static_cast<float*>(p));
  instantiate_combines<float, __nv_bfloat16, float>(ctx, static_cast<float*>(p), static_cast<__nv_bfloat16*>(p));
  instantiate_combines<float, __half, float>(ctx, static_cast<float*>(p), static_cast<__half*>(p));
  instantiate_combines<double, __nv_bfloat16, double>(ctx, static_cast<double*>(p), static_cast<__nv_bfloat16*>(p));
}

}  // namespace dr2net::testing
