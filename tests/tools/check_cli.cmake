# Runs one command line of a program and checks how it ends.
# cmake -DPROG=<program> -DARGS=<arguments separated by |> -DEXPECT=usage|help [-DREGEX=<regex>] -P check_cli.cmake
#   usage: exit status 2 and one line on stderr that matches REGEX (the flag's name);
#   help:  exit status 0 and a usage text on stdout.
string(REPLACE "|" ";" args "${ARGS}")
execute_process(COMMAND ${PROG} ${args} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(EXPECT STREQUAL "help")
  if(NOT rc EQUAL 0 OR NOT out MATCHES "Usage:")
    message(FATAL_ERROR "'${ARGS}': expected the help text and exit status 0, got ${rc}: ${out}${err}")
  endif()
  return()
endif()
if(NOT rc EQUAL 2)
  message(FATAL_ERROR "'${ARGS}': expected exit status 2 (usage error), got '${rc}'; stderr: ${err}")
endif()
if(NOT err MATCHES "${REGEX}")
  message(FATAL_ERROR "'${ARGS}': the message does not match '${REGEX}': ${err}")
endif()
string(REGEX MATCHALL "\n" lines "${err}")
list(LENGTH lines n)
if(NOT n EQUAL 1)
  message(FATAL_ERROR "'${ARGS}': expected one line on stderr, got ${n}: ${err}")
endif()
message(STATUS "'${ARGS}': ${err}")
