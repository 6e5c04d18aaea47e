# cmake -DNVCC=<nvcc> -DSOURCE=<combine_kernels.cu> -DINCLUDE_DIR=<include> -DTESTS_DIR=<tests>
#       -DOUT=<scratch dir> [-DHOST_COMPILER=<c++>] [-DARCH=<sm number>] -P check_stack_frames.cmake
# Compiles the elementwise kernels of every fused combine pass (combine_kernels.cu) with
# ptxas's resource report and fails when any of them has a stack frame or spills: the
# vectorised passes keep their operands in register arrays indexed only at compile time, and a
# runtime-selected pointer into one of them would put it in local memory. Needs no GPU.
cmake_minimum_required(VERSION 3.25)
foreach(v NVCC SOURCE INCLUDE_DIR TESTS_DIR OUT)
  if(NOT ${v})
    message(FATAL_ERROR "check_stack_frames: pass -D${v}=...")
  endif()
endforeach()
if(NOT ARCH)
  set(ARCH 90)
endif()
set(host "")
if(HOST_COMPILER)
  set(host -ccbin ${HOST_COMPILER})
endif()
file(MAKE_DIRECTORY ${OUT})
execute_process(
  COMMAND ${NVCC} ${host} -O3 -DNDEBUG -arch=sm_${ARCH} -std=c++20 --expt-relaxed-constexpr --extended-lambda
          -diag-suppress=554 -I${INCLUDE_DIR} -I${TESTS_DIR} -Xptxas -v -c ${SOURCE} -o ${OUT}/combine_kernels.o
  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
set(report "${out}${err}")
file(WRITE ${OUT}/ptxas-report.txt "${report}")
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "check_stack_frames: nvcc failed (${rc}):\n${report}")
endif()

# ptxas reports per entry: "Compiling entry function '<mangled>'", then
# "<N> bytes stack frame, <S> bytes spill stores, <L> bytes spill loads".
string(REPLACE "\n" ";" lines "${report}")
set(kernel "")
set(vectorized 0)
set(scalar 0)
set(bad "")
foreach(line IN LISTS lines)
  if(line MATCHES "Compiling entry function '([^']+)'")
    set(kernel "${CMAKE_MATCH_1}")
  elseif(line MATCHES "([0-9]+) bytes stack frame, ([0-9]+) bytes spill stores, ([0-9]+) bytes spill loads")
    set(usage "${CMAKE_MATCH_0}")
    set(frame ${CMAKE_MATCH_1})
    set(spill_stores ${CMAKE_MATCH_2})
    set(spill_loads ${CMAKE_MATCH_3})
    if(kernel MATCHES "vectorized_kernel")
      math(EXPR vectorized "${vectorized} + 1")
    elseif(kernel MATCHES "elementwise_kernel")
      math(EXPR scalar "${scalar} + 1")
    else()
      continue()
    endif()
    if(NOT frame EQUAL 0 OR NOT spill_stores EQUAL 0 OR NOT spill_loads EQUAL 0)
      list(APPEND bad "${kernel}: ${usage}")
    endif()
    set(kernel "")
  endif()
endforeach()
# combine_kernels.cu instantiates the vector path of ForwardCombine, InverseCombine, both
# BackwardCombines and both conversions for six policies (some conversions coincide).
if(vectorized LESS 30 OR scalar LESS 30)
  message(FATAL_ERROR "check_stack_frames: found only ${vectorized} vectorised and ${scalar} element-wise "
                      "combine kernels in the ptxas report (see ${OUT}/ptxas-report.txt)")
endif()
if(bad)
  string(REPLACE ";" "\n  " b "${bad}")
  message(FATAL_ERROR "check_stack_frames: combine kernels with local memory (mangled names; c++filt reads them):\n  ${b}")
endif()
message(STATUS "check_stack_frames: ${vectorized} vectorised and ${scalar} element-wise combine kernels, "
               "no stack frame and no spills")
