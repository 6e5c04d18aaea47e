#pragma once
//! \file
//! Compiler and platform configuration shared by every dr2net header.

//! Marks arithmetic that the host backend and the CUDA backend share: `__host__ __device__`
//! when compiled by nvcc (`__CUDACC__` defined), empty in a plain C++ compiler, so one
//! definition serves the host loops and the device kernels.
#if defined(__CUDACC__)
#define DR2NET_HD __host__ __device__
#define DR2NET_HD_INLINE __host__ __device__ __forceinline__
#else
#define DR2NET_HD
//! DR2NET_HD for the small functions and functor call operators defined in headers:
//! `__host__ __device__ __forceinline__` under nvcc, `inline` in a plain C++ compiler.
#define DR2NET_HD_INLINE inline
#endif

//! Major part of the library version MAJOR.MINOR.PATCH (the CMake package's version).
#define DR2NET_VERSION_MAJOR 0
//! Minor part of the library version MAJOR.MINOR.PATCH.
#define DR2NET_VERSION_MINOR 1
//! Patch part of the library version MAJOR.MINOR.PATCH.
#define DR2NET_VERSION_PATCH 0
