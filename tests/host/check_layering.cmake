# cmake -DINCLUDE_DIR=<include> [-DWORK_DIR=<scratch>] -P check_layering.cmake
# The headers under INCLUDE_DIR/dr2net depend one way: block -> backend -> core. Each layer
# below may include (as "dr2net/<layer>/..." or <dr2net/<layer>/...>) only the layers listed
# for it; an include of any other dr2net header, or a relative include of one, is a violation.
# Every violation is reported with its file, line and the include, and the run fails.
# With WORK_DIR, the checker first runs on a small tree of its own with known violations and
# fails unless it reports exactly those (so that it cannot pass by finding nothing).
cmake_minimum_required(VERSION 3.25)

# "<layer>: <layers it may include>"; a layer always may include itself. The host backend may
# not include the CUDA backend (a host-only consumer has no CUDA toolkit), and block reaches a
# backend only through the context type it is instantiated with, so it includes none.
set(layer_rules
  "core:"
  "precision: core"
  "schedule: core"
  "backend/host: core precision"
  "backend/cuda: core precision backend/host"
  "block: core precision schedule")

# The layer of a header path relative to dr2net/ ("backend/cuda/x.cuh" -> backend/cuda).
function(layer_of rel out)
  if(rel MATCHES "^backend/([^/]+)/")
    set(${out} "backend/${CMAKE_MATCH_1}" PARENT_SCOPE)
  elseif(rel MATCHES "^([^/]+)/")
    set(${out} "${CMAKE_MATCH_1}" PARENT_SCOPE)
  else()
    set(${out} "" PARENT_SCOPE)  # dr2net/dr2net.hpp, the umbrella header
  endif()
endfunction()

# check_tree(<dr2net dir> <violations var> <checked files var>)
function(check_tree root violations_var count_var)
  set(violations "")
  set(count 0)
  foreach(rule IN LISTS layer_rules)
    string(REGEX MATCH "^([^:]+):(.*)$" _ "${rule}")
    set(layer "${CMAKE_MATCH_1}")
    separate_arguments(allowed UNIX_COMMAND "${CMAKE_MATCH_2}")
    if(NOT IS_DIRECTORY ${root}/${layer})
      list(APPEND violations "${layer}/: no such layer under ${root} (the rules are out of date)")
      continue()
    endif()
    file(GLOB_RECURSE headers RELATIVE ${root} ${root}/${layer}/*.hpp ${root}/${layer}/*.cuh ${root}/${layer}/*.h)
    if(NOT headers)
      list(APPEND violations "${layer}/: no headers found")
    endif()
    foreach(rel IN LISTS headers)
      math(EXPR count "${count} + 1")
      file(STRINGS ${root}/${rel} lines)
      set(line_no 0)
      foreach(line IN LISTS lines)
        math(EXPR line_no "${line_no} + 1")
        if(NOT line MATCHES "^[ \t]*#[ \t]*include[ \t]*([<\"])([^>\"]+)[>\"]")
          continue()
        endif()
        set(delim "${CMAKE_MATCH_1}")
        set(target "${CMAKE_MATCH_2}")
        if(target MATCHES "^dr2net/(.*)$")
          layer_of("${CMAKE_MATCH_1}" to)
          if(NOT to STREQUAL "" AND (to STREQUAL layer OR to IN_LIST allowed))
            continue()
          endif()
          list(APPEND violations "${rel}:${line_no}: ${layer} includes ${target}")
        elseif(delim STREQUAL "\"")
          list(APPEND violations "${rel}:${line_no}: relative include \"${target}\" (name dr2net headers as dr2net/<layer>/...)")
        endif()
      endforeach()
    endforeach()
  endforeach()
  set(${violations_var} "${violations}" PARENT_SCOPE)
  set(${count_var} ${count} PARENT_SCOPE)
endfunction()

if(WORK_DIR)  # the checker on a tree with one violation of each kind, and clean files
  set(t ${WORK_DIR}/dr2net)
  file(REMOVE_RECURSE ${WORK_DIR})
  file(WRITE ${t}/core/a.hpp "#include <vector>\n#include \"dr2net/core/b.hpp\"\n")
  file(WRITE ${t}/core/b.hpp "  #  include <dr2net/block/x.hpp>\n")
  file(WRITE ${t}/precision/p.hpp "#include \"dr2net/core/a.hpp\"\n")
  file(WRITE ${t}/schedule/s.hpp "#include \"dr2net/precision/p.hpp\"\n")
  file(WRITE ${t}/backend/host/h.hpp "#include \"dr2net/backend/cuda/c.cuh\"\n#include \"h2.hpp\"\n")
  file(WRITE ${t}/backend/cuda/c.cuh "#include \"dr2net/backend/host/h.hpp\"\n#include \"dr2net/modules/m.hpp\"\n")
  file(WRITE ${t}/block/x.hpp "#include \"dr2net/schedule/s.hpp\"\n#include \"dr2net/backend/host/h.hpp\"\n// #include \"dr2net/modules/m.hpp\"\n")
  check_tree(${t} got n)
  set(expected
    "core/b.hpp:1: core includes dr2net/block/x.hpp"
    "schedule/s.hpp:1: schedule includes dr2net/precision/p.hpp"
    "backend/host/h.hpp:1: backend/host includes dr2net/backend/cuda/c.cuh"
    "backend/host/h.hpp:2: relative include \"h2.hpp\" (name dr2net headers as dr2net/<layer>/...)"
    "backend/cuda/c.cuh:2: backend/cuda includes dr2net/modules/m.hpp"
    "block/x.hpp:2: block includes dr2net/backend/host/h.hpp")
  if(NOT got STREQUAL expected OR NOT n EQUAL 7)
    string(REPLACE ";" "\n  " g "${got}")
    string(REPLACE ";" "\n  " e "${expected}")
    message(FATAL_ERROR "check_layering: the checker is wrong on its own test tree (${n} files).\n"
                        "Expected:\n  ${e}\nGot:\n  ${g}")
  endif()
endif()

if(NOT INCLUDE_DIR)
  message(FATAL_ERROR "check_layering: pass -DINCLUDE_DIR=<the include directory>")
endif()
check_tree(${INCLUDE_DIR}/dr2net violations n)
if(violations)
  list(LENGTH violations k)
  string(REPLACE ";" "\n  " v "${violations}")
  message(FATAL_ERROR "check_layering: ${k} include(s) against the layering (block -> backend -> core):\n  ${v}")
endif()
message(STATUS "check_layering: ${n} headers of core, precision, schedule, backend and block include only the layers below them")
