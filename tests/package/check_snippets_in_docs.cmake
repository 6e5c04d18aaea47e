# cmake -DSNIPPETS_DIR=<tests/package/snippets> -DDOC=<page.md> -P check_snippets_in_docs.cmake
# Every CMake snippet the packaging tests run is, verbatim, a ```cmake block of the page.
cmake_minimum_required(VERSION 3.25)
include(${CMAKE_CURRENT_LIST_DIR}/snippet_in_doc.cmake)
file(GLOB snippets ${SNIPPETS_DIR}/*.cmake)
if(NOT snippets)
  message(FATAL_ERROR "check_snippets_in_docs: no snippets in ${SNIPPETS_DIR}")
endif()
foreach(file IN LISTS snippets)
  dr2net_require_snippet_in_doc(check_snippets_in_docs ${DOC} ${file})
endforeach()
list(LENGTH snippets n)
message(STATUS "check_snippets_in_docs: ${n} snippets found verbatim in ${DOC}")
