# dr2net_mpi_tests: one executable, its case chosen by the first argument, run under the MPI
# launcher with 1, 2 or 3 ranks (--oversubscribe with Open MPI: the ranks may outnumber the
# cores). Every rank runs one host thread. As root (CI containers) Open MPI needs
# OMPI_ALLOW_RUN_AS_ROOT and its confirmation; single-copy shared memory (CMA) is off because
# containers often forbid the ptrace it needs. Under the sanitizers leak checks are off: MPI's
# own allocations are never freed.
if(NOT MPIEXEC_EXECUTABLE)
  message(STATUS "dr2net: no MPI launcher (mpiexec/mpirun) found; the multi-rank tests are not registered")
  return()
endif()
add_executable(dr2net_mpi_tests mpi_tests.cpp)
target_include_directories(dr2net_mpi_tests PRIVATE ${DR2NET_TESTS_DIR})
target_link_libraries(dr2net_mpi_tests PRIVATE dr2net::mpi dr2net_dev_flags)
if(TARGET dr2net::io)
  target_link_libraries(dr2net_mpi_tests PRIVATE dr2net::io)
  target_compile_definitions(dr2net_mpi_tests PRIVATE DR2NET_TEST_HAVE_IO=1)
endif()
if(TARGET dr2net_cblas)
  target_link_libraries(dr2net_mpi_tests PRIVATE dr2net_cblas)
endif()

set(_dr2net_mpi_flags ${MPIEXEC_PREFLAGS})
execute_process(COMMAND ${MPIEXEC_EXECUTABLE} --version OUTPUT_VARIABLE _dr2net_mpiexec_version ERROR_QUIET)
if(_dr2net_mpiexec_version MATCHES "Open MPI|OpenRTE")
  list(APPEND _dr2net_mpi_flags --oversubscribe)
endif()
set(_dr2net_mpi_env
  OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
  OMP_NUM_THREADS=1 DR2NET_NUM_THREADS=1)
set(DR2NET_MPI_TEST_DIR ${CMAKE_CURRENT_BINARY_DIR}/mpi-test-files)
file(MAKE_DIRECTORY ${DR2NET_MPI_TEST_DIR})

# dr2net_add_mpi_test(<case> <ranks> [FIXTURES_SETUP f | FIXTURES_REQUIRED f]): ctest name mpi_<case>_<ranks>.
function(dr2net_add_mpi_test case ranks)
  set(name mpi_${case}_${ranks})
  add_test(NAME ${name}
    COMMAND ${MPIEXEC_EXECUTABLE} ${MPIEXEC_NUMPROC_FLAG} ${ranks} ${_dr2net_mpi_flags}
            $<TARGET_FILE:dr2net_mpi_tests> ${MPIEXEC_POSTFLAGS} ${case} ${DR2NET_MPI_TEST_DIR})
  set_tests_properties(${name} PROPERTIES ENVIRONMENT "${_dr2net_mpi_env}" TIMEOUT 300 PROCESSORS ${ranks}
                                          LABELS "distributed;mpi" ${ARGN})
  if(DR2NET_SANITIZE)
    set_tests_properties(${name} PROPERTIES ENVIRONMENT_MODIFICATION "ASAN_OPTIONS=string_append::detect_leaks=0")
  endif()
endfunction()

foreach(ranks 2 3)
  dr2net_add_mpi_test(collectives ${ranks})
  dr2net_add_mpi_test(gradients ${ranks})
  dr2net_add_mpi_test(buckets ${ranks})
  dr2net_add_mpi_test(adamw ${ranks})
endforeach()
dr2net_add_mpi_test(mismatch 2)
dr2net_add_mpi_test(early_exit 2)
dr2net_add_mpi_test(closed 2)
if(TARGET dr2net::io)
  dr2net_add_mpi_test(checkpoint_write 2 FIXTURES_SETUP dr2net_mpi_checkpoint)
  dr2net_add_mpi_test(checkpoint_load 1 FIXTURES_REQUIRED dr2net_mpi_checkpoint)
  dr2net_add_mpi_test(checkpoint_load 3 FIXTURES_REQUIRED dr2net_mpi_checkpoint)
endif()
