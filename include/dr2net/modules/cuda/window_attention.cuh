#pragma once
//! \file
//! CudaWindowAttention<T>: modules/window_attention.hpp's WindowAttention instantiated for the
//! CUDA backend, with the same configuration, geometry, tensor names (norm1.*, attn.qkv.*,
//! attn.relative_position_bias_table, attn.proj.*; parameter_prefix ""), drop masks (the same
//! Philox streams, bit-identical keep decisions) and contract. Parameters live in device
//! memory; for_each_parameter hands out DeviceView<T>s. Saved internals: the 256-byte aligned
//! layout of SavedLayoutBuilder (see the host file).

#include "dr2net/modules/cuda/types.cuh"  // first: see its diagnostic note

#include "dr2net/backend/cuda/context.hpp"
#include "dr2net/backend/cuda/elementwise.cuh"
#include "dr2net/modules/cuda/layer_norm.cuh"
#include "dr2net/modules/cuda/linear.cuh"
#include "dr2net/modules/cuda/parameter.cuh"
#include "dr2net/modules/cuda/primitives.cuh"
#include "dr2net/modules/window_attention.hpp"

namespace dr2net {

//! The device window-attention residual function: WindowAttention<T, CudaContext>. T is
//! double, float, __nv_bfloat16 or __half.
template <class T>
using CudaWindowAttention = WindowAttention<T, CudaContext>;

}  // namespace dr2net
