# Builds the consumer project with one of the docs' snippets (add_subdirectory or FetchContent)
# and checks what dr2net leaves in a consumer's project:
#   1. the snippet file is, verbatim, a ```cmake block of the docs page;
#   2. the options the page documents are those dr2net declares, and the consumer's cache holds
#      no entry that dr2net added (compared with the same project configured without dr2net):
#      not even its options, only CMake's own per-project, FetchContent and CUDA entries;
#   3. CUDA is enabled in the consumer only when it asked (DR2NET_ENABLE_CUDA=ON), and then a
#      CMAKE_CUDA_ARCHITECTURES set by the consumer keeps its value;
#   4. the consumer builds and runs (unless BUILD is OFF), with the host GEMM EXPECT_GEMM names;
#   5. `cmake --install` of the consumer installs its own program and nothing of dr2net.
#
# cmake -DMODE=[cblas_]add_subdirectory|fetchcontent -DSOURCE_DIR=<dr2net> -DCONSUMER_DIR=<consumer>
#       -DSNIPPET=<file> -DDOC=<page.md> -DWORK_DIR=<scratch> -DGENERATOR=<g> -DCXX=<compiler>
#       [-DEXTRA_ARGS=<;-list of -D flags>] [-DEXPECT_CUDA=ON] [-DEXPECT_GEMM=cblas] [-DBUILD=OFF]
#       -P check_consumer.cmake
cmake_minimum_required(VERSION 3.25)

foreach(v MODE SOURCE_DIR CONSUMER_DIR SNIPPET DOC WORK_DIR GENERATOR CXX)
  if(NOT DEFINED ${v})
    message(FATAL_ERROR "check_consumer: -D${v}=... is required")
  endif()
endforeach()
if(NOT DEFINED BUILD)
  set(BUILD ON)
endif()

function(run_checked what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "check_consumer: ${what} failed (${rc}):\n${out}\n${err}")
  endif()
  set(run_output "${out}" PARENT_SCOPE)
endfunction()

# ---- 1. the snippet is in the docs, verbatim ----------------------------------------------
include(${CMAKE_CURRENT_LIST_DIR}/snippet_in_doc.cmake)
dr2net_require_snippet_in_doc(check_consumer ${DOC} ${SNIPPET})
file(READ ${SNIPPET} snippet)
file(READ ${DOC} doc)

# The options the page documents: the rows of its options table, "| `DR2NET_...` |".
string(REGEX MATCHALL "\n\\| `DR2NET_[A-Z0-9_]+` \\|" rows "${doc}")
set(documented "")
foreach(row IN LISTS rows)
  string(REGEX REPLACE "^\n\\| `(DR2NET_[A-Z0-9_]+)` \\|$" "\\1" name "${row}")
  list(APPEND documented ${name})
endforeach()
if(NOT documented)
  message(FATAL_ERROR "check_consumer: ${DOC} has no options table (rows '| `DR2NET_...` |')")
endif()
# ... are exactly the options dr2net declares (_dr2net_option in CMakeLists.txt and cmake/).
file(GLOB cmake_files ${SOURCE_DIR}/cmake/*.cmake)
set(declared "")
foreach(f ${SOURCE_DIR}/CMakeLists.txt ${cmake_files})
  file(STRINGS ${f} lines REGEX "^ *_dr2net_option\\(DR2NET_[A-Z0-9_]+ ")
  foreach(line IN LISTS lines)
    string(REGEX REPLACE "^ *_dr2net_option\\((DR2NET_[A-Z0-9_]+) .*" "\\1" name "${line}")
    list(APPEND declared ${name})
  endforeach()
endforeach()
foreach(name IN LISTS declared)
  if(NOT name IN_LIST documented)
    message(FATAL_ERROR "check_consumer: option ${name} is missing from the options table of ${DOC}")
  endif()
endforeach()
foreach(name IN LISTS documented)
  if(NOT name IN_LIST declared)
    message(FATAL_ERROR "check_consumer: ${DOC} documents an option ${name} that dr2net does not declare")
  endif()
endforeach()

# ---- the consumer project and dr2net's sources, as a user would have them -----------------
file(STRINGS ${SOURCE_DIR}/CMakeLists.txt version REGEX "^set\\(PROJECT_VERSION [0-9.]+\\)$")
string(REGEX REPLACE "^set\\(PROJECT_VERSION ([0-9.]+)\\)$" "\\1" version "${version}")
if(NOT version MATCHES "^[0-9]+\\.[0-9]+\\.[0-9]+$")
  message(FATAL_ERROR "check_consumer: no 'set(PROJECT_VERSION x.y.z)' line in ${SOURCE_DIR}/CMakeLists.txt")
endif()

file(REMOVE_RECURSE ${WORK_DIR})
file(COPY ${CONSUMER_DIR}/ DESTINATION ${WORK_DIR}/src)
set(dr2net_files ${SOURCE_DIR}/CMakeLists.txt ${SOURCE_DIR}/cmake ${SOURCE_DIR}/include)
set(args -G ${GENERATOR} -DCMAKE_CXX_COMPILER=${CXX} ${EXTRA_ARGS})
if(MODE MATCHES "add_subdirectory$")
  file(COPY ${dr2net_files} DESTINATION ${WORK_DIR}/src/third_party/dr2net)
elseif(MODE STREQUAL "fetchcontent")
  # A git repository of the sources with the release tag the snippet names.
  string(FIND "${snippet}" "GIT_TAG v${version}" tag_at)
  if(tag_at EQUAL -1)
    message(FATAL_ERROR "check_consumer: the FetchContent snippet does not name GIT_TAG v${version}, "
                        "the tag of the version in CMakeLists.txt")
  endif()
  set(repo ${WORK_DIR}/dr2net-repository)
  file(COPY ${dr2net_files} DESTINATION ${repo})
  find_program(GIT git REQUIRED)
  set(git ${GIT} -C ${repo} -c user.name=dr2net-test -c user.email=dr2net-test@localhost)
  run_checked("git init" ${git} init -q)
  run_checked("git add" ${git} add -A)
  run_checked("git commit" ${git} commit -q -m "dr2net ${version}")
  run_checked("git tag" ${git} tag -a v${version} -m "dr2net ${version}")
  list(APPEND args -DDR2NET_GIT_REPOSITORY=${repo})
else()
  message(FATAL_ERROR "check_consumer: unknown MODE '${MODE}'")
endif()

# ---- 2. configure without and with dr2net, compare the caches ----------------------------
function(cache_names build_dir out_var)
  file(STRINGS ${build_dir}/CMakeCache.txt lines REGEX "^[A-Za-z_][A-Za-z0-9_.+-]*:[A-Z]+=")
  set(names "")
  foreach(line IN LISTS lines)
    string(REGEX REPLACE ":.*" "" name "${line}")
    list(APPEND names ${name})
  endforeach()
  set(${out_var} ${names} PARENT_SCOPE)
endfunction()

run_checked("configuring the consumer without dr2net"
  ${CMAKE_COMMAND} -S ${WORK_DIR}/src -B ${WORK_DIR}/baseline ${args} -DDR2NET_CONSUME=none)
cache_names(${WORK_DIR}/baseline baseline_names)
run_checked("configuring the consumer with ${SNIPPET}"
  ${CMAKE_COMMAND} -S ${WORK_DIR}/src -B ${WORK_DIR}/build ${args} -DDR2NET_CONSUME=snippet -DDR2NET_SNIPPET=${SNIPPET})
set(configure_output "${run_output}")
cache_names(${WORK_DIR}/build names)

set(added "")
foreach(name IN LISTS names)
  # "NAME-ADVANCED" and the like are properties of NAME, and DR2NET_CONSUME and DR2NET_SNIPPET
  # are this consumer's own.
  # Options the consumer set with -D are in the baseline too; dr2net writes none itself.
  if(name MATCHES "-" OR name IN_LIST baseline_names OR name MATCHES "^DR2NET_(CONSUME|SNIPPET)$")
    continue()
  endif()
  # CMake's own entries: project() writes <name>_SOURCE_DIR/_BINARY_DIR/_IS_TOP_LEVEL for every
  # project; find_package(nlohmann_json) writes nlohmann_json_DIR; FetchContent and its git.
  if(name MATCHES "^dr2net_(SOURCE_DIR|BINARY_DIR|IS_TOP_LEVEL)$" OR name STREQUAL "nlohmann_json_DIR")
    continue()
  endif()
  if(MODE STREQUAL "fetchcontent" AND name MATCHES "^(FETCHCONTENT_.*|GIT_EXECUTABLE|FIND_PACKAGE_MESSAGE_DETAILS_Git)$")
    continue()
  endif()
  # With CUDA asked for, enable_language(CUDA) and find_package(CUDAToolkit) (which finds
  # Threads) write CMake's entries.
  if(EXPECT_CUDA AND name MATCHES
     "^(CMAKE_CUDA_.*|CUDAToolkit_.*|CUDA_.*|CMAKE_HAVE_LIBC_PTHREAD|FIND_PACKAGE_MESSAGE_DETAILS_(CUDAToolkit|Threads))$")
    continue()
  endif()
  # With DR2NET_USE_CBLAS on: the CBLAS search's results and pkg-config's entries (FindPkgConfig
  # keeps its results, DR2NET_OPENBLAS_*, and prefix_result as INTERNAL entries).
  if(EXPECT_GEMM STREQUAL "cblas" AND name MATCHES
     "^(DR2NET_CBLAS_(INCLUDE_DIR|LIBRARY)|DR2NET_OPENBLAS_.*|PKG_CONFIG_.*|__pkg_config_.*|pkgcfg_lib_DR2NET_OPENBLAS_.*|prefix_result|FIND_PACKAGE_MESSAGE_DETAILS_PkgConfig)$")
    continue()
  endif()
  list(APPEND added ${name})
endforeach()
if(added)
  list(JOIN added ", " added)
  message(FATAL_ERROR "check_consumer: dr2net wrote to the consumer's cache (entries beyond those "
                      "${DOC} lists as CMake's own): ${added}")
endif()

# ---- 3. CUDA only when asked ---------------------------------------------------------------
file(READ ${WORK_DIR}/build/enabled-languages.txt languages)
if(EXPECT_CUDA AND NOT "CUDA" IN_LIST languages)
  message(FATAL_ERROR "check_consumer: DR2NET_ENABLE_CUDA=ON did not enable CUDA (languages: ${languages})")
elseif(NOT EXPECT_CUDA AND "CUDA" IN_LIST languages)
  message(FATAL_ERROR "check_consumer: dr2net enabled CUDA in a consumer that did not ask for it")
endif()
foreach(arg IN LISTS EXTRA_ARGS)
  if(arg MATCHES "^-DCMAKE_CUDA_ARCHITECTURES=(.*)$")
    set(asked "${CMAKE_MATCH_1}")
    file(STRINGS ${WORK_DIR}/build/CMakeCache.txt arch REGEX "^CMAKE_CUDA_ARCHITECTURES:")
    string(REGEX REPLACE "^[^=]*=" "" arch "${arch}")
    if(NOT arch STREQUAL asked)
      message(FATAL_ERROR "check_consumer: CMAKE_CUDA_ARCHITECTURES is '${arch}', the consumer set '${asked}'")
    endif()
  endif()
endforeach()

# ---- 4. build and run ----------------------------------------------------------------------
if(BUILD)
  run_checked("building the consumer" ${CMAKE_COMMAND} --build ${WORK_DIR}/build)
  run_checked("running the consumer" ${WORK_DIR}/build/my_trainer)
  if(NOT run_output MATCHES "consumer: dr2net ${version} works")
    message(FATAL_ERROR "check_consumer: the consumer printed '${run_output}'")
  endif()
  if(DEFINED EXPECT_GEMM AND NOT run_output MATCHES "\\(host GEMM: ${EXPECT_GEMM}\\)")
    message(FATAL_ERROR "check_consumer: expected the host GEMM '${EXPECT_GEMM}'; the consumer printed '${run_output}'")
  endif()

  # ---- 5. install: the consumer's program, nothing of dr2net -------------------------------
  run_checked("installing the consumer" ${CMAKE_COMMAND} --install ${WORK_DIR}/build --prefix ${WORK_DIR}/prefix)
  file(GLOB_RECURSE installed RELATIVE ${WORK_DIR}/prefix ${WORK_DIR}/prefix/*)
  if(NOT installed STREQUAL "bin/my_trainer")
    list(JOIN installed ", " installed)
    message(FATAL_ERROR "check_consumer: installing the consumer installed '${installed}'; "
                        "expected bin/my_trainer alone (no dr2net headers, package files or tools)")
  endif()
endif()
message(STATUS "check_consumer: ${MODE} consumer OK (${version}; languages ${languages})")
