# cmake -DPAGE=<page.md> -DPAGE_NAME=<name> -DOUT=<file stem> [-DHAVE_IO=ON] -P extract_page.cmake
# Runs the extraction of one page on its own (for check_directives.cmake): writes <OUT>.cpp
# (and <OUT>.cu) and prints the number of blocks.
cmake_minimum_required(VERSION 3.25)
include(${CMAKE_CURRENT_LIST_DIR}/extract_snippets.cmake)
if(NOT DEFINED HAVE_IO)
  set(HAVE_IO ON)
endif()
dr2net_extract_snippets(${PAGE} ${PAGE_NAME} ${OUT}.cpp ${OUT}.cu ${HAVE_IO} n_cpp n_cu)
message(STATUS "extracted ${n_cpp} cpp ${n_cu} cuda")
