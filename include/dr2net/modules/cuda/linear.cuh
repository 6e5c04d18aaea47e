#pragma once
//! \file
//! CudaLinear<T>: modules/linear.hpp's Linear instantiated for the CUDA backend (weight [out, in]
//! and bias [out] in device memory, y = x W^T + b through cuBLASLt with the bias epilogue).
//! This header brings in the device primitives the one implementation calls.

#include "dr2net/modules/cuda/types.cuh"  // first: see its diagnostic note

#include "dr2net/backend/cuda/context.hpp"
#include "dr2net/modules/cuda/parameter.cuh"
#include "dr2net/modules/cuda/primitives.cuh"
#include "dr2net/modules/linear.hpp"

namespace dr2net {

//! The device fully connected layer: Linear<T, CudaContext>. T is double, float,
//! __nv_bfloat16 or __half; every call only enqueues work on the context's stream.
template <class T>
using CudaLinear = Linear<T, CudaContext>;

}  // namespace dr2net
