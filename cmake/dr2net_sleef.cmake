# Optional SLEEF (vectorised elementary functions) for the host kernels of dr2net's own programs
# (tests, benchmarks, tools).
#
# Defines the INTERFACE target dr2net_sleef, alias dr2net::sleef (not installed or exported),
# when SLEEF is found (Debian: libsleef-dev): it adds DR2NET_HAVE_SLEEF and links libsleef, and
# the host's GELU, softmax and LayerNorm kernels (backend/host/vector_math.hpp) then evaluate
# erf and exp through SLEEF's 1.0-ulp vector functions, several elements per instruction.
# Without it they use the C library's scalar erff/expf, as before. The vector width follows the
# compiler's target flags (docs/host-performance.md, "Vector math"): 4 lanes (SSE2) for the
# default x86-64 build, 8 (AVX) or 16 (AVX-512F) when CMAKE_CXX_FLAGS or DR2NET_HOST_ARCH carry
# e.g. -march=x86-64-v3 or -march=x86-64-v4.
# DR2NET_USE_SLEEF defaults to ON only when dr2net is the top-level project; a consumer using
# add_subdirectory/FetchContent sets it ON and links dr2net::sleef, and a consumer of the
# installed package defines DR2NET_HAVE_SLEEF and links libsleef itself.

_dr2net_option(DR2NET_USE_SLEEF "Use SLEEF's vector erf/exp in dr2net's host kernels when it is found" ${PROJECT_IS_TOP_LEVEL})

if(DR2NET_USE_SLEEF AND NOT TARGET dr2net_sleef)
  # 1. pkg-config's sleef (Debian ships sleef.pc), 2. the default search paths (Debian puts
  # sleef.h in the multiarch include directory, which find_path searches).
  find_package(PkgConfig QUIET)
  if(PkgConfig_FOUND)
    pkg_check_modules(DR2NET_SLEEF_PC QUIET sleef)
  endif()
  find_path(DR2NET_SLEEF_INCLUDE_DIR sleef.h HINTS ${DR2NET_SLEEF_PC_INCLUDE_DIRS})
  find_library(DR2NET_SLEEF_LIBRARY NAMES sleef HINTS ${DR2NET_SLEEF_PC_LIBRARY_DIRS})

  if(DR2NET_SLEEF_INCLUDE_DIR AND DR2NET_SLEEF_LIBRARY)
    add_library(dr2net_sleef INTERFACE)
    target_include_directories(dr2net_sleef SYSTEM INTERFACE ${DR2NET_SLEEF_INCLUDE_DIR})
    target_link_libraries(dr2net_sleef INTERFACE ${DR2NET_SLEEF_LIBRARY})
    target_compile_definitions(dr2net_sleef INTERFACE DR2NET_HAVE_SLEEF)
    add_library(dr2net::sleef ALIAS dr2net_sleef)

    # Which of SLEEF's vector widths the headers will pick under the flags of this build (the
    # same macro tests as backend/host/vector_math.hpp).
    include(CheckCXXSourceCompiles)
    set(CMAKE_REQUIRED_QUIET ON)
    set(_dr2net_arch_flag "")
    if(DR2NET_HOST_ARCH)
      set(_dr2net_arch_flag "-march=${DR2NET_HOST_ARCH}")
    endif()
    set(CMAKE_REQUIRED_FLAGS "${_dr2net_arch_flag}")
    set(_dr2net_sleef_width "none: not an x86 target with SSE2; the scalar C library is used")
    foreach(_dr2net_isa "16 lanes (AVX-512F)|__AVX512F__" "8 lanes (AVX)|__AVX__" "4 lanes (SSE2)|__SSE2__")
      string(REPLACE "|" ";" _dr2net_isa "${_dr2net_isa}")
      list(GET _dr2net_isa 0 _dr2net_isa_name)
      list(GET _dr2net_isa 1 _dr2net_isa_macro)
      # Cached per set of flags: a reconfigure with other -march flags checks again.
      string(MD5 _dr2net_flags_hash "${CMAKE_CXX_COMPILER} ${CMAKE_CXX_FLAGS} ${_dr2net_arch_flag}")
      string(SUBSTRING "${_dr2net_flags_hash}" 0 8 _dr2net_flags_hash)
      string(MAKE_C_IDENTIFIER "DR2NET_SLEEF_HAS${_dr2net_isa_macro}_${_dr2net_flags_hash}" _dr2net_isa_var)
      check_cxx_source_compiles("
#if !(defined(__x86_64__) || defined(__i386__)) || !defined(${_dr2net_isa_macro})
#error not this width
#endif
int main() { return 0; }" ${_dr2net_isa_var})
      if(${_dr2net_isa_var})
        set(_dr2net_sleef_width "${_dr2net_isa_name}")
        break()
      endif()
    endforeach()
    unset(CMAKE_REQUIRED_FLAGS)
    message(STATUS "dr2net: host erf/exp use SLEEF (${DR2NET_SLEEF_LIBRARY}, header in "
                   "${DR2NET_SLEEF_INCLUDE_DIR}); vector width under these flags: ${_dr2net_sleef_width}")
  else()
    message(STATUS "dr2net: no SLEEF found (Debian: libsleef-dev); host kernels use the C library's scalar erff/expf")
  endif()
elseif(NOT DR2NET_USE_SLEEF AND PROJECT_IS_TOP_LEVEL)
  message(STATUS "dr2net: DR2NET_USE_SLEEF is OFF; host kernels use the C library's scalar erff/expf")
endif()
