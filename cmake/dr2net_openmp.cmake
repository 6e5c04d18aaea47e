# Optional OpenMP: the host backend's one thread pool (include/dr2net/backend/host/parallel.hpp).
#
# Defines the INTERFACE target dr2net_openmp, alias dr2net::openmp (not installed or exported),
# when the C++ compiler supports OpenMP: it links OpenMP::OpenMP_CXX, so the host kernels of a
# program built with it run on HostContext::threads() threads. dr2net's own programs get it
# through dr2net_dev_flags. Without OpenMP everything runs on one thread. DR2NET_USE_OPENMP
# defaults to ON only when dr2net is the top-level project; a consumer using
# add_subdirectory/FetchContent sets it ON and links dr2net::openmp, and a consumer of the
# installed package links OpenMP::OpenMP_CXX itself (docs/host-performance.md, "Threads").
# Results are bit-identical with and without it, at any thread count.

_dr2net_option(DR2NET_USE_OPENMP "Run dr2net's host kernels on the OpenMP thread pool when OpenMP is found" ${PROJECT_IS_TOP_LEVEL})

if(DR2NET_USE_OPENMP AND NOT TARGET dr2net_openmp)
  find_package(OpenMP QUIET COMPONENTS CXX)
  if(OpenMP_CXX_FOUND)
    add_library(dr2net_openmp INTERFACE)
    target_link_libraries(dr2net_openmp INTERFACE OpenMP::OpenMP_CXX)
    add_library(dr2net::openmp ALIAS dr2net_openmp)
    message(STATUS "dr2net: host kernels run on the OpenMP thread pool (OpenMP ${OpenMP_CXX_VERSION}); "
                   "threads from HostContextOptions::threads, DR2NET_NUM_THREADS or OMP_NUM_THREADS")
  else()
    message(STATUS "dr2net: OpenMP not found; host kernels run on one thread")
  endif()
elseif(NOT DR2NET_USE_OPENMP AND PROJECT_IS_TOP_LEVEL)
  message(STATUS "dr2net: DR2NET_USE_OPENMP is OFF; host kernels run on one thread")
endif()
