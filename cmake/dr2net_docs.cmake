# The `docs` target: Doxygen's HTML reference of the public headers (include/dr2net), from
# docs/Doxyfile.in, written to <build dir>/docs/api/html. Defined only when dr2net is the
# top-level project and doxygen is found. Any Doxygen warning, an undocumented public entity
# included, fails the target.
#
# DR2NET_DOCS_INPUT (default: include/dr2net) may name other directories, for checking the
# configuration itself against a scratch header.

if(NOT PROJECT_IS_TOP_LEVEL)
  return()
endif()
find_package(Doxygen QUIET)
if(NOT DOXYGEN_FOUND)
  message(STATUS "dr2net: doxygen not found; no `docs` target (Debian: apt-get install doxygen)")
  return()
endif()

if(NOT DEFINED DR2NET_DOCS_INPUT)
  set(DR2NET_DOCS_INPUT ${PROJECT_SOURCE_DIR}/include/dr2net)
endif()
set(DR2NET_DOCS_STRIP_PATH ${PROJECT_SOURCE_DIR}/include)
set(DR2NET_DOCS_OUTPUT_DIR ${PROJECT_BINARY_DIR}/docs/api)
configure_file(${PROJECT_SOURCE_DIR}/docs/Doxyfile.in ${PROJECT_BINARY_DIR}/docs/Doxyfile @ONLY)
# Runs on every build of the target: a run that warned must fail again the next time, which
# an output file that Doxygen writes even when it fails would prevent.
add_custom_target(docs
  COMMAND ${CMAKE_COMMAND} -E make_directory ${DR2NET_DOCS_OUTPUT_DIR}
  COMMAND Doxygen::doxygen ${PROJECT_BINARY_DIR}/docs/Doxyfile
  COMMENT "Doxygen: API reference in ${DR2NET_DOCS_OUTPUT_DIR}/html (warnings are errors)"
  VERBATIM)
message(STATUS "dr2net: doxygen ${DOXYGEN_VERSION} found (${DOXYGEN_EXECUTABLE}); "
               "`cmake --build ${PROJECT_BINARY_DIR} --target docs` writes the API reference")
