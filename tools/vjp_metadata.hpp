#pragma once
// dr2net-vjp's output metadata, shared by the host path (dr2net_vjp.cpp, which defines
// metadata()) and the CUDA path (dr2net_vjp_cuda.cu).

#include <cstddef>
#include <map>
#include <string>

#include "dr2net/core/reconstruction.hpp"
#include "dr2net/schedule/coefficients.hpp"

namespace dr2net_vjp {

//! What a run knows for the output file's metadata; the host and the CUDA path both fill it.
struct RunInfo {
  std::string mode, precision, backend;
  int num_heads = 0;
  //! "vit" (a stack of timm ViT blocks) or "swin" (timm Swin stages: then num_heads above is
  //! unused and the three strings below, copied from the weights' metadata, are written).
  std::string arch = "vit";
  std::string swin_num_heads, swin_window_size, swin_depths;  //!< comma lists, as in the weights file
  dr2net::Coefficients requested;  //!< --alpha, --beta
  dr2net::Coefficients used;       //!< as the stack's arithmetic uses them (stack.coefficients(0, 0))
  int stream_frac_bits = 0;        //!< > 0: fixed-point streams with this many fractional bits
  dr2net::ReconstructionReport report;
  std::size_t side_bits_bytes = 0;
};

//! The metadata of the output file. Numbers are written with 17 significant digits (they
//! read back as the same double); nothing that was not measured is written as a number.
std::map<std::string, std::string> metadata(const RunInfo& r);

}  // namespace dr2net_vjp
