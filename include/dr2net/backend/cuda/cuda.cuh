#pragma once
//! \file
//! The CUDA backend in one include, for translation units compiled by nvcc: the context and
//! its buffers, copies, the elementwise launcher of the block's fused passes, the monitor's
//! reduction and the bf16/fp16 compute types. Include it before instantiating a
//! ReversibleStack whose functions declare `using context_type = dr2net::CudaContext;`.

#include "dr2net/backend/cuda/context.hpp"
#include "dr2net/backend/cuda/copy.hpp"
#include "dr2net/backend/cuda/elementwise.cuh"
#include "dr2net/backend/cuda/error.hpp"
#include "dr2net/backend/cuda/precision.cuh"
#include "dr2net/backend/cuda/reduce.cuh"
