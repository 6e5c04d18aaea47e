# Optional CUDA backend: the INTERFACE target dr2net::cuda (dr2net + cudart + cuBLAS + cuBLASLt).
#
# DR2NET_ENABLE_CUDA defaults to ON when dr2net is the top-level project and a CUDA compiler is
# found, and to OFF under add_subdirectory/FetchContent: a consumer's project gets CUDA enabled
# (and CMake's CUDA cache entries) only when it sets DR2NET_ENABLE_CUDA=ON. When dr2net is the
# top-level project and CMAKE_CUDA_ARCHITECTURES is unset, it defaults to 90 (Hopper, a normal
# variable) so that CI compiles every CUDA target for the machines the GPU checks run on; a
# consumer's setting is never overridden, and an unset one is left to CMake's own default.
# scripts/gpu-check configures with -DCMAKE_CUDA_ARCHITECTURES=native.
#
# dr2net::cuda is not exported or installed with the package: the installed package must
# stay usable by consumers without a CUDA toolkit. Consumers that want the CUDA backend link
# dr2net::dr2net plus CUDA::cudart, CUDA::cublas and CUDA::cublasLt themselves and compile
# the translation units that include dr2net/backend/cuda/*.cuh with nvcc (see docs/gpu.md).

include(CheckLanguage)
set(_dr2net_cuda_default OFF)
if(PROJECT_IS_TOP_LEVEL)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    set(_dr2net_cuda_default ON)
  else()
    message(STATUS "dr2net: no CUDA compiler found; the CUDA backend (dr2net::cuda) is not built")
  endif()
endif()
_dr2net_option(DR2NET_ENABLE_CUDA "Build dr2net's CUDA backend, GPU tests and GPU benchmarks" ${_dr2net_cuda_default})
unset(_dr2net_cuda_default)

if(DR2NET_ENABLE_CUDA)
  check_language(CUDA)
  if(NOT CMAKE_CUDA_COMPILER)
    message(FATAL_ERROR "dr2net: DR2NET_ENABLE_CUDA is ON but no CUDA compiler was found "
                        "(put nvcc on PATH, or set CUDACXX or CMAKE_CUDA_COMPILER)")
  endif()
  if(PROJECT_IS_TOP_LEVEL AND NOT DEFINED CMAKE_CUDA_ARCHITECTURES AND NOT DEFINED ENV{CUDAARCHS})
    set(CMAKE_CUDA_ARCHITECTURES 90)
  endif()
  enable_language(CUDA)
  find_package(CUDAToolkit REQUIRED)

  add_library(dr2net_cuda INTERFACE)
  add_library(dr2net::cuda ALIAS dr2net_cuda)
  target_link_libraries(dr2net_cuda INTERFACE dr2net CUDA::cudart CUDA::cublas CUDA::cublasLt)
  # C++20 in device code. CMake releases older than the nvcc they drive do not list its
  # features (CMake 3.25 with nvcc 13), so fall back to the flag itself there.
  if("cuda_std_20" IN_LIST CMAKE_CUDA_COMPILE_FEATURES)
    target_compile_features(dr2net_cuda INTERFACE cuda_std_20)
  else()
    target_compile_options(dr2net_cuda INTERFACE $<$<COMPILE_LANGUAGE:CUDA>:-std=c++20>)
  endif()
  # Lambdas and constexpr host functions in device code (std::numeric_limits, etc.).
  # Diagnostic 554: TensorView<const T>'s conversion operator to itself is never used, which
  # is intended (one template serves both constnesses); EDG warns about it, GCC does not.
  target_compile_options(dr2net_cuda INTERFACE
    $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr --extended-lambda -diag-suppress=554>)
  message(STATUS "dr2net: CUDA backend enabled (nvcc ${CMAKE_CUDA_COMPILER_VERSION}, "
                 "architectures ${CMAKE_CUDA_ARCHITECTURES})")
endif()
