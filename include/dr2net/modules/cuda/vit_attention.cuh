#pragma once
//! \file
//! CudaVitAttention<T>: modules/vit_attention.hpp's VitAttention instantiated for the CUDA
//! backend, with the same configuration, tensor names (norm1.*, attn.qkv.*, attn.proj.*;
//! parameter_prefix ""), drop masks (the same Philox streams, bit-identical keep decisions) and
//! contract. Parameters live in device memory; for_each_parameter hands out DeviceView<T>s.
//! Saved internals: the 256-byte aligned layout of SavedLayoutBuilder (see the host file).

#include "dr2net/modules/cuda/types.cuh"  // first: see its diagnostic note

#include "dr2net/backend/cuda/context.hpp"
#include "dr2net/backend/cuda/elementwise.cuh"
#include "dr2net/modules/cuda/layer_norm.cuh"
#include "dr2net/modules/cuda/linear.cuh"
#include "dr2net/modules/cuda/parameter.cuh"
#include "dr2net/modules/cuda/primitives.cuh"
#include "dr2net/modules/vit_attention.hpp"

namespace dr2net {

//! Options of the device functions (the former name of FunctionOptions).
using CudaFunctionOptions = FunctionOptions;

//! The device attention residual function: VitAttention<T, CudaContext>. T is double, float,
//! __nv_bfloat16 or __half.
template <class T>
using CudaVitAttention = VitAttention<T, CudaContext>;

}  // namespace dr2net
