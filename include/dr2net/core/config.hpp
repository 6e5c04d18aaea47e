#pragma once
//! \file
//! Compiler and platform configuration shared by every dr2net header.

//! Marks arithmetic that the host backend and the CUDA backend share.
#if defined(__CUDACC__)
#define DR2NET_HD __host__ __device__
#define DR2NET_HD_INLINE __host__ __device__ __forceinline__
#else
#define DR2NET_HD
#define DR2NET_HD_INLINE inline
#endif

#define DR2NET_VERSION_MAJOR 0
#define DR2NET_VERSION_MINOR 1
#define DR2NET_VERSION_PATCH 0
