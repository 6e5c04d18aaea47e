# cmake -DSNIPPETS_DIR=<tests/package/snippets> -DDOC=<page.md> -P check_snippets_in_docs.cmake
# Every CMake snippet the packaging tests run is, verbatim, a ```cmake block of the page.
cmake_minimum_required(VERSION 3.25)
file(READ ${DOC} doc)
file(GLOB snippets ${SNIPPETS_DIR}/*.cmake)
if(NOT snippets)
  message(FATAL_ERROR "check_snippets_in_docs: no snippets in ${SNIPPETS_DIR}")
endif()
foreach(file IN LISTS snippets)
  file(READ ${file} snippet)
  string(FIND "${doc}" "```cmake\n${snippet}```" at)
  if(at EQUAL -1)
    get_filename_component(name ${file} NAME)
    message(FATAL_ERROR "check_snippets_in_docs: ${DOC} has no ```cmake block with exactly the text of "
                        "${name}; the page and the tested snippet must match:\n${snippet}")
  endif()
endforeach()
list(LENGTH snippets n)
message(STATUS "check_snippets_in_docs: ${n} snippets found verbatim in ${DOC}")
