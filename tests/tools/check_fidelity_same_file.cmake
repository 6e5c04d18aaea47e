# dr2net-fidelity refuses an output (--json, --png) that is the same file as its input
# (--weights) or as the other output, by the same string, ./x vs x, a symbolic link and a hard
# link; nothing is run, and the input file is unchanged.
# cmake -DTOOL=<dr2net-fidelity> -DOUT=<dir> -P check_fidelity_same_file.cmake
file(REMOVE_RECURSE ${OUT})
file(MAKE_DIRECTORY ${OUT})
set(content "not really a checkpoint, but it must survive")
file(WRITE ${OUT}/w.safetensors "${content}")
file(CREATE_LINK ${OUT}/w.safetensors ${OUT}/symlink.safetensors SYMBOLIC)
file(CREATE_LINK ${OUT}/w.safetensors ${OUT}/hardlink.safetensors)
set(cases
  "--weights|w.safetensors|--json|w.safetensors"
  "--weights|w.safetensors|--json|./w.safetensors"
  "--weights|./w.safetensors|--png|${OUT}/w.safetensors"
  "--weights|w.safetensors|--json|symlink.safetensors"
  "--weights|symlink.safetensors|--json|hardlink.safetensors"
  "--weights|w.safetensors|--png|hardlink.safetensors"
  "--json|out.json|--png|./out.json")
foreach(c ${cases})
  string(REPLACE "|" ";" args "${c}")
  execute_process(COMMAND ${TOOL} ${args} --layers 1 --dim 8 --heads 2 --mlp 8 --tokens 2 --batch 1
                  WORKING_DIRECTORY ${OUT} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 2 OR NOT err MATCHES "is the same file as (--weights|--json)")
    message(FATAL_ERROR "'${c}': expected exit status 2 and 'is the same file as', got ${rc}: ${err}")
  endif()
  file(READ ${OUT}/w.safetensors now)
  if(NOT now STREQUAL content)
    message(FATAL_ERROR "'${c}': the input file changed")
  endif()
  if(EXISTS ${OUT}/out.json)
    message(FATAL_ERROR "'${c}': an output was written")
  endif()
endforeach()
message(STATUS "dr2net-fidelity: outputs that are inputs refused")
