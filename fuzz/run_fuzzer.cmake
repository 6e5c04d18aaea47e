# Runs the safetensors fuzzer once for ctest (cmake -P). Arguments:
#   FUZZER     the fuzzer executable
#   SEED_DIR   the generated seed corpus (only read)
#   WORK_DIR   scratch space under the build tree: libFuzzer adds the inputs it
#              finds to its first corpus directory and writes crash artifacts,
#              so both go here, emptied first to keep runs reproducible
#   RUNS       number of inputs to try
#   MAX_LEN    largest input in bytes; large enough for the seed with a big header
#   MAX_TIME   a bound on the whole run in seconds (libFuzzer stops there, passing)
# A crash, sanitizer report, timeout or oversized allocation makes libFuzzer
# exit non-zero, which fails the test.
foreach(var FUZZER SEED_DIR WORK_DIR RUNS MAX_LEN MAX_TIME)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "run_fuzzer.cmake: ${var} is not set")
  endif()
endforeach()

file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}/corpus" "${WORK_DIR}/artifacts")

execute_process(
  COMMAND "${FUZZER}" "${WORK_DIR}/corpus" "${SEED_DIR}"
          -runs=${RUNS} -max_len=${MAX_LEN} -max_total_time=${MAX_TIME} -seed=1 -timeout=10 -rss_limit_mb=2048
          -malloc_limit_mb=256 -print_final_stats=1
          "-artifact_prefix=${WORK_DIR}/artifacts/"
  RESULT_VARIABLE result)
if(NOT result EQUAL 0)
  message(FATAL_ERROR "safetensors fuzzer failed (exit ${result}); reproducer in ${WORK_DIR}/artifacts/")
endif()
