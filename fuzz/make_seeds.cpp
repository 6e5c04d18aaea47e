// Writes a few valid safetensors files (small ones and one with a large header)
// into the directory given as the only argument: the fuzzer's seed corpus.
// Generated at build time so the seeds always match the current writer and no
// binary files live in the source tree.

#include <cstdio>
#include <string>
#include <vector>

#include "dr2net/core/error.hpp"
#include "dr2net/io/safetensors.hpp"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s <output directory>\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  using dr2net::io::DType;
  try {
    {
      // Every dtype, a scalar, an empty tensor and metadata.
      dr2net::io::SafetensorsWriter w;
      w.set_metadata("format", "pt");
      const std::vector<float> v{1.0f, -2.5f, 65504.0f, 1e-7f, -0.0f, 3.0f};
      w.add("a.f64", DType::F64, {2, 3}, v);
      w.add("b.f32", DType::F32, {3, 2}, v);
      w.add("c.f16", DType::F16, {6}, v);
      w.add("d.bf16", DType::BF16, {1, 6}, v);
      w.add("e.scalar", DType::F32, {}, v.data());
      w.add("f.empty", DType::F16, {0, 4}, v.data());
      w.write_file(dir + "/all_dtypes.safetensors");
    }
    {
      dr2net::io::SafetensorsWriter w;
      const double x = 0.1;
      w.add("x", DType::BF16, {1}, &x);
      w.write_file(dir + "/single.safetensors");
    }
    dr2net::io::SafetensorsWriter{}.write_file(dir + "/empty.safetensors");
    {
      // A large header (about 200 KB, 3000 entries) so that mutations reach the code paths
      // of big headers: many objects for the duplicate-key check, long sorted maps.
      dr2net::io::SafetensorsWriter w;
      w.set_metadata("format", "pt");
      const float one = 1.0f;
      for (int i = 0; i < 3000; ++i) {
        w.add("blocks." + std::to_string(i / 12) + ".t" + std::to_string(i % 12) + ".weight",
              i % 2 == 0 ? DType::F32 : DType::BF16, {1}, &one);
      }
      w.write_file(dir + "/large_header.safetensors");
    }
  } catch (const dr2net::Error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  return 0;
}
