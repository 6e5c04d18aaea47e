# Optional MPI for data-parallel training (dr2net/distributed/mpi_communicator.hpp): the
# INTERFACE target dr2net_mpi, alias dr2net::mpi (not installed or exported), when MPI's C API
# is found (Debian: libopenmpi-dev openmpi-bin). It links MPI::MPI_CXX (found without MPI's
# deprecated C++ bindings: MPI_CXX_SKIP_MPICXX, so only the C library is linked) and defines
# DR2NET_HAVE_MPI; dr2net's multi-rank tests, the MPI benchmark and the examples' MPI support
# are built with it, and run through MPIEXEC_EXECUTABLE (mpirun). Without it everything else
# configures, builds and tests as before, and the distributed headers that need no MPI
# (communicator concept, LocalCommunicator, the data-parallel driver, sharded AdamW) still work
# in a world of one process.
# DR2NET_USE_MPI defaults to ON only when dr2net is the top-level project; a consumer using
# add_subdirectory/FetchContent sets it ON and links dr2net::mpi, and a consumer of the
# installed package links MPI (find_package(MPI)) and defines DR2NET_HAVE_MPI itself.

_dr2net_option(DR2NET_USE_MPI "Build dr2net's MPI communicator support and multi-rank tests when MPI is found" ${PROJECT_IS_TOP_LEVEL})

if(DR2NET_USE_MPI AND NOT TARGET dr2net_mpi)
  # The CXX component (dr2net is a C++ project) without the C++ bindings: MPI's C API only.
  if(NOT DEFINED MPI_CXX_SKIP_MPICXX)
    set(MPI_CXX_SKIP_MPICXX ON)
  endif()
  find_package(MPI QUIET COMPONENTS CXX)
  if(MPI_CXX_FOUND)
    add_library(dr2net_mpi INTERFACE)
    add_library(dr2net::mpi ALIAS dr2net_mpi)
    target_link_libraries(dr2net_mpi INTERFACE dr2net MPI::MPI_CXX)
    target_compile_definitions(dr2net_mpi INTERFACE DR2NET_HAVE_MPI=1)
    set(_dr2net_mpi_launcher "no launcher (mpiexec) found: the multi-rank tests are not registered")
    if(MPIEXEC_EXECUTABLE)
      execute_process(COMMAND ${MPIEXEC_EXECUTABLE} --version OUTPUT_VARIABLE _dr2net_mpi_version ERROR_QUIET)
      string(REGEX REPLACE "[\r\n].*" "" _dr2net_mpi_version "${_dr2net_mpi_version}")
      set(_dr2net_mpi_launcher "launcher ${MPIEXEC_EXECUTABLE} (${_dr2net_mpi_version})")
    endif()
    message(STATUS "dr2net: MPI ${MPI_CXX_VERSION} found (${MPI_CXX_LIB_NAMES}); ${_dr2net_mpi_launcher}")
    unset(_dr2net_mpi_launcher)
    unset(_dr2net_mpi_version)
  else()
    message(STATUS "dr2net: no MPI found (Debian: libopenmpi-dev openmpi-bin); the MPI communicator, "
                   "multi-rank tests and MPI benchmark are not built")
  endif()
elseif(NOT DR2NET_USE_MPI AND PROJECT_IS_TOP_LEVEL)
  message(STATUS "dr2net: DR2NET_USE_MPI is OFF; no MPI communicator, multi-rank tests or MPI benchmark")
endif()
