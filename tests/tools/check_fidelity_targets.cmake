# The fidelity targets, measured by dr2net-fidelity on the paper's schedule path: a 12-layer
# stack, D = 64, 4 heads, MLP 256, 64 tokens, fp32, pretrained-like random weights.
# Error-bounded mode: worst parameter-gradient error <= 1e-5 at every point; peak activation
# memory <= 30% of standard at (1, 0.1) and equal to plain reversible at (0, 1).
execute_process(
  COMMAND ${TOOL} --layers 12 --dim 64 --heads 4 --mlp 256 --tokens 64 --batch 2 --seed 1 --path 11
          --precision fp32 --mode reversible,error-bounded --tolerance 1e-5 --json ${OUT}
  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "dr2net-fidelity failed (${rc}): ${err}")
endif()
file(READ ${OUT} json)
string(JSON n LENGTH "${json}")
math(EXPR last "${n} - 1")
foreach(i RANGE ${last})
  string(JSON alpha GET "${json}" ${i} alpha)
  string(JSON mode GET "${json}" ${i} mode)
  string(JSON err GET "${json}" ${i} max_param_grad_rel_err)
  string(JSON peak GET "${json}" ${i} peak_activation_bytes)
  string(JSON std_peak GET "${json}" ${i} standard_peak_activation_bytes)
  if(mode STREQUAL "reversible")
    set(reversible_peak_${alpha} ${peak})
    continue()
  endif()
  if(err GREATER 1e-5)
    message(FATAL_ERROR "error-bounded gradient error ${err} > 1e-5 at alpha ${alpha}")
  endif()
  if(alpha EQUAL 1)
    math(EXPR limit "${std_peak} * 30 / 100")
    if(peak GREATER limit)
      message(FATAL_ERROR "error-bounded peak ${peak} > 30% of standard ${std_peak} at (1, 0.1)")
    endif()
  endif()
  if(alpha EQUAL 0 AND NOT peak EQUAL reversible_peak_${alpha})
    message(FATAL_ERROR "error-bounded peak ${peak} != reversible ${reversible_peak_${alpha}} at (0, 1)")
  endif()
endforeach()
message(STATUS "fidelity targets met on ${n} records")
