#pragma once
//! \file
//! CudaVitMlp<T>: modules/vit_mlp.hpp's VitMlp instantiated for the CUDA backend, with the same
//! configuration, tensor names (norm2.*, mlp.fc1.*, mlp.fc2.*), drop masks and contract.
//! Parameters live in device memory; for_each_parameter hands out DeviceView<T>s.

#include "dr2net/modules/cuda/types.cuh"  // first: see its diagnostic note

#include "dr2net/backend/cuda/context.hpp"
#include "dr2net/backend/cuda/elementwise.cuh"
#include "dr2net/modules/cuda/layer_norm.cuh"
#include "dr2net/modules/cuda/linear.cuh"
#include "dr2net/modules/cuda/parameter.cuh"
#include "dr2net/modules/cuda/primitives.cuh"
#include "dr2net/modules/cuda/vit_attention.cuh"
#include "dr2net/modules/vit_mlp.hpp"

namespace dr2net {

//! The device MLP residual function: VitMlp<T, CudaContext>. T is double, float,
//! __nv_bfloat16 or __half.
template <class T>
using CudaVitMlp = VitMlp<T, CudaContext>;

}  // namespace dr2net
