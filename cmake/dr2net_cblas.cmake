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

  if(DR2NET_CBLAS_INCLUDE_DIR AND DR2NET_CBLAS_LIBRARY)
    add_library(dr2net_cblas INTERFACE)
    # SYSTEM: OpenBLAS's headers trip -Wpedantic (C99 _Complex) under clang.
    target_include_directories(dr2net_cblas SYSTEM INTERFACE ${DR2NET_CBLAS_INCLUDE_DIR})
    target_link_libraries(dr2net_cblas INTERFACE ${DR2NET_CBLAS_LIBRARY})
    target_compile_definitions(dr2net_cblas INTERFACE DR2NET_HAVE_CBLAS)
    add_library(dr2net::cblas ALIAS dr2net_cblas)
    message(STATUS "dr2net: host GEMM uses CBLAS (${DR2NET_CBLAS_LIBRARY}, header in ${DR2NET_CBLAS_INCLUDE_DIR})")
  else()
    message(STATUS "dr2net: no CBLAS (OpenBLAS) found; host GEMM uses dr2net's blocked loops")
  endif()
elseif(NOT DR2NET_USE_CBLAS AND PROJECT_IS_TOP_LEVEL)
  message(STATUS "dr2net: DR2NET_USE_CBLAS is OFF; host GEMM uses dr2net's blocked loops")
endif()

