# dr2net-fidelity refuses outputs it could not write before it runs anything (a --json or --png
# in a directory that does not exist, or that is a directory), reports a write that fails when
# flushed (/dev/full: no space left) with exit status 1 and the reason, and refuses inputs too
# large for the machine naming --batch and --tokens (never a bare std::bad_alloc).
# cmake -DTOOL=<dr2net-fidelity> -DOUT=<dir> -P check_fidelity_outputs.cmake
cmake_policy(SET CMP0057 NEW)  # if(IN_LIST)
file(REMOVE_RECURSE ${OUT})
file(MAKE_DIRECTORY ${OUT}/sub)
set(small --layers 1 --dim 8 --heads 2 --mlp 8 --alphas 0 --betas 1)
# case | regex the one error line must match | whether the table may have been printed
set(cases
  "--json|no/such/dir/out.json=--json 'no/such/dir/out.json': directory 'no/such/dir' does not exist=no"
  "--png|no/such/dir/out.png=--png 'no/such/dir/out.png': directory 'no/such/dir' does not exist=no"
  "--json|sub=--json 'sub': it is a directory=no"
  "--batch|1000000000|--tokens|1000000000=--batch x --tokens x D .*overflows.*=no"
  "--batch|1000|--tokens|100000000=--batch 1000 x --tokens 100000000 x D 8: .* physical memory=no")
if(EXISTS /dev/full)
  list(APPEND cases "--json|/dev/full=--json: error writing '/dev/full': .+=yes" "--png|/dev/full=error writing '/dev/full': .+=yes")
endif()
foreach(c ${cases})
  string(REPLACE "=" ";" parts "${c}")
  list(GET parts 0 extra)
  list(GET parts 1 regex)
  list(GET parts 2 ran)
  string(REPLACE "|" ";" extra "${extra}")
  if(NOT "--batch" IN_LIST extra)
    list(APPEND extra --tokens 2 --batch 1)
  endif()
  execute_process(COMMAND ${TOOL} ${small} ${extra} WORKING_DIRECTORY ${OUT} RESULT_VARIABLE rc OUTPUT_VARIABLE out
                  ERROR_VARIABLE err)
  if(NOT rc EQUAL 1 OR NOT err MATCHES "^dr2net-fidelity: ${regex}\n$" OR err MATCHES "std::|bad_alloc")
    message(FATAL_ERROR "'${c}': expected exit status 1 and one line matching '${regex}', got ${rc}: ${err}")
  endif()
  if(ran STREQUAL "no" AND NOT out STREQUAL "")
    message(FATAL_ERROR "'${c}': the grid ran before the output was refused:\n${out}")
  endif()
endforeach()
file(GLOB left ${OUT}/*)
if(NOT left STREQUAL "${OUT}/sub")
  message(FATAL_ERROR "files were written: ${left}")
endif()
message(STATUS "dr2net-fidelity: unwritable outputs and oversized inputs refused")
