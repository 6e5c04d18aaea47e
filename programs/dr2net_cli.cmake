# dr2net_cli: the command-line setup of dr2net's own programs (programs/cli.hpp over CLI11).
# A development target only: the library and its installed targets never depend on CLI11.
# Included by every directory whose programs parse command lines; where CLI11 is missing, those
# programs (and the tests that run them) are skipped with a message, and the rest still builds.
include_guard(GLOBAL)
find_package(CLI11 2 CONFIG QUIET GLOBAL)
if(CLI11_FOUND)
  add_library(dr2net_cli INTERFACE)
  target_include_directories(dr2net_cli INTERFACE ${CMAKE_CURRENT_LIST_DIR})
  target_link_libraries(dr2net_cli INTERFACE CLI11::CLI11)
else()
  message(STATUS "dr2net: CLI11 not found (Debian: libcli11-dev); the tools, examples and benchmarks "
                 "that parse command lines are not built")
endif()
