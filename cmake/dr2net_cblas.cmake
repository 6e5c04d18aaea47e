# Optional CBLAS for the host GEMM of dr2net's own programs (tests, benchmarks, tools).
#
# Defines the INTERFACE target dr2net_cblas, alias dr2net::cblas (not installed or exported),
# when a CBLAS is found: it adds DR2NET_HAVE_CBLAS and links the library, and host_gemm then
# calls cblas_sgemm/cblas_dgemm. Without it host_gemm runs its own blocked loops.
# DR2NET_USE_CBLAS defaults to ON only when dr2net is the top-level project; a consumer using
# add_subdirectory/FetchContent sets it ON and links dr2net::cblas, and a consumer of the
# installed package defines DR2NET_HAVE_CBLAS and links a CBLAS itself
# (docs/getting-started.md, "CBLAS").

_dr2net_option(DR2NET_USE_CBLAS "Use a CBLAS (OpenBLAS) for dr2net's host GEMM when one is found" ${PROJECT_IS_TOP_LEVEL})

if(DR2NET_USE_CBLAS AND NOT TARGET dr2net_cblas)
  set(_dr2net_cblas_include "")
  set(_dr2net_cblas_library "")

  # 0. With OpenMP (dr2net_openmp.cmake), OpenBLAS's OpenMP build first (Debian:
  # libopenblas-openmp-dev, which installs beside the default pthread build): it runs on the
  # same OpenMP pool as dr2net's kernels and, unlike the pthread build, keeps no thread pool of
  # its own and needs no process-wide setting to stay on one thread per call
  # (docs/host-performance.md, "Threads"). The build tree's RPATH selects it at run time.
  if(TARGET dr2net_openmp)
    set(_dr2net_omp_lib_dirs "")
    set(_dr2net_omp_inc_dirs "")
    foreach(prefix IN LISTS CMAKE_PREFIX_PATH CMAKE_SYSTEM_PREFIX_PATH)
      if(CMAKE_LIBRARY_ARCHITECTURE)
        list(APPEND _dr2net_omp_lib_dirs ${prefix}/lib/${CMAKE_LIBRARY_ARCHITECTURE}/openblas-openmp)
        list(APPEND _dr2net_omp_inc_dirs ${prefix}/include/${CMAKE_LIBRARY_ARCHITECTURE}/openblas-openmp)
      endif()
      list(APPEND _dr2net_omp_lib_dirs ${prefix}/lib/openblas-openmp)
      list(APPEND _dr2net_omp_inc_dirs ${prefix}/include/openblas-openmp)
    endforeach()
    find_library(DR2NET_CBLAS_OPENMP_LIBRARY NAMES openblas PATHS ${_dr2net_omp_lib_dirs} NO_DEFAULT_PATH)
    find_path(DR2NET_CBLAS_OPENMP_INCLUDE_DIR cblas.h PATHS ${_dr2net_omp_inc_dirs} NO_DEFAULT_PATH)
    if(DR2NET_CBLAS_OPENMP_LIBRARY AND DR2NET_CBLAS_OPENMP_INCLUDE_DIR)
      set(_dr2net_cblas_library ${DR2NET_CBLAS_OPENMP_LIBRARY})
      set(_dr2net_cblas_include ${DR2NET_CBLAS_OPENMP_INCLUDE_DIR})
    endif()
  endif()

  # 1. pkg-config's openblas: its include directory holds the cblas.h matching the library.
  find_package(PkgConfig QUIET)
  if(PkgConfig_FOUND)
    pkg_check_modules(DR2NET_OPENBLAS QUIET openblas)
  endif()
  if(DR2NET_OPENBLAS_FOUND)
    find_path(DR2NET_CBLAS_INCLUDE_DIR cblas.h HINTS ${DR2NET_OPENBLAS_INCLUDE_DIRS} NO_DEFAULT_PATH)
    find_library(DR2NET_CBLAS_LIBRARY NAMES openblas HINTS ${DR2NET_OPENBLAS_LIBRARY_DIRS} NO_DEFAULT_PATH)
  endif()
  # 2. Otherwise the default search paths (cblas.h may sit in an openblas/ subdirectory).
  find_path(DR2NET_CBLAS_INCLUDE_DIR cblas.h PATH_SUFFIXES openblas)
  find_library(DR2NET_CBLAS_LIBRARY NAMES openblas)

  if(NOT _dr2net_cblas_library AND DR2NET_CBLAS_INCLUDE_DIR AND DR2NET_CBLAS_LIBRARY)
    set(_dr2net_cblas_library ${DR2NET_CBLAS_LIBRARY})
    set(_dr2net_cblas_include ${DR2NET_CBLAS_INCLUDE_DIR})
  endif()

  if(_dr2net_cblas_include AND _dr2net_cblas_library)
    add_library(dr2net_cblas INTERFACE)
    # SYSTEM: OpenBLAS's headers trip -Wpedantic (C99 _Complex) under clang.
    target_include_directories(dr2net_cblas SYSTEM INTERFACE ${_dr2net_cblas_include})
    target_link_libraries(dr2net_cblas INTERFACE ${_dr2net_cblas_library})
    target_compile_definitions(dr2net_cblas INTERFACE DR2NET_HAVE_CBLAS)
    add_library(dr2net::cblas ALIAS dr2net_cblas)
    message(STATUS "dr2net: host GEMM uses CBLAS (${_dr2net_cblas_library}, header in ${_dr2net_cblas_include})")
  else()
    message(STATUS "dr2net: no CBLAS (OpenBLAS) found; host GEMM uses dr2net's blocked loops")
  endif()
elseif(NOT DR2NET_USE_CBLAS AND PROJECT_IS_TOP_LEVEL)
  message(STATUS "dr2net: DR2NET_USE_CBLAS is OFF; host GEMM uses dr2net's blocked loops")
endif()

