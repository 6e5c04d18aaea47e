# cmake -DWORK_DIR=<scratch> -P check_directives.cmake
# Checks the snippet directives of extract_snippets.cmake on small pages: how each kind of
# block is wrapped, that #line names the page and line, and that a malformed directive is an
# error naming the page, the line and what is wrong.
cmake_minimum_required(VERSION 3.25)
file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR})

# extract(<name> <page text> <result var> <output var>)
function(extract name text rc_var out_var)
  file(WRITE ${WORK_DIR}/${name}.md "${text}")
  execute_process(COMMAND ${CMAKE_COMMAND} -DPAGE=${WORK_DIR}/${name}.md -DPAGE_NAME=${name}.md
                          -DOUT=${WORK_DIR}/${name} -P ${CMAKE_CURRENT_LIST_DIR}/extract_page.cmake
                  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  set(${rc_var} ${rc} PARENT_SCOPE)
  set(${out_var} "${out}${err}" PARENT_SCOPE)
endfunction()
function(expect_match what text regex)
  if(NOT text MATCHES "${regex}")
    message(FATAL_ERROR "check_directives: ${what}: expected /${regex}/ in:\n${text}")
  endif()
endfunction()

# A page with each kind of block; brackets, semicolons and backslashes survive extraction.
set(page [=[
# Page

```sh
echo "not C++; ignored"
```

```cpp
#include <array>
inline std::array<int, 2> a{1, 2};  // at namespace scope
```

<!-- snippet: function -->
```cpp
const char* s = "a\\b;c[0]";
(void)s;
```

<!-- snippet: members -->

```cpp
int member = 0;
```

<!-- snippet: skip pseudo-code, not C++ -->
```cpp
for each layer: ...
```

```cuda
__global__ void k() {}
```
]=])
extract(good "${page}" rc out)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "check_directives: a well-formed page failed to extract:\n${out}")
endif()
expect_match("block count" "${out}" "extracted 3 cpp 1 cuda")
file(READ ${WORK_DIR}/good.cpp cpp)
expect_match("umbrella header first" "${cpp}" "^// Generated[^\n]*\n#include <dr2net/dr2net.hpp>\n#include <array>\n")
expect_match("namespace-scope block" "${cpp}" "namespace dr2net_snippet_good_md_8 {\n#line 8 \"good.md\"\n\ninline std::array<int, 2> a{1, 2};")
expect_match("function block" "${cpp}" "void snippet\\(\\) {\n#line 14 \"good.md\"\nconst char\\* s = \"a\\\\\\\\b;c\\[0\\]\";\n\\(void\\)s;\n}\n")
expect_match("members block" "${cpp}" "struct Snippet {\n#line 21 \"good.md\"\nint member = 0;\n};\n")
if(cpp MATCHES "for each layer" OR cpp MATCHES "echo")
  message(FATAL_ERROR "check_directives: a skipped or non-C++ block was extracted:\n${cpp}")
endif()
file(READ ${WORK_DIR}/good.cu cu)
expect_match("cuda block" "${cu}" "#line 30 \"good.md\"\n__global__ void k\\(\\) {}")

# Malformed directives: each an error naming the page, the line and the problem.
set(cases
  "noreason|text\n\n<!-- snippet: skip -->\n```cpp\nx\n```\n|noreason.md:3: `snippet: skip` needs a reason"
  "unknown|<!-- snippet: fucntion -->\n```cpp\nx\n```\n|unknown.md:1: unknown snippet directive word 'fucntion'"
  "uses|<!-- snippet: function uses=nothing_here -->\n```cpp\nx\n```\n|uses.md:1: no tests/snippets/uses/nothing_here.hpp"
  "notcpp|<!-- snippet: function -->\n```sh\nx\n```\n|notcpp.md:1: a snippet directive stands before a block that is not"
  "stray|<!-- snippet: function -->\nSome text.\n```cpp\nx\n```\n|stray.md:1: the snippet directive 'function' is not followed"
  "unclosed|```cpp\nx\n|unclosed.md: a code block is not closed")
foreach(case IN LISTS cases)
  string(REPLACE "|" ";" parts "${case}")
  list(GET parts 0 name)
  list(GET parts 1 text)
  list(GET parts 2 message)
  string(REPLACE "\\n" "\n" text "${text}")
  extract(${name} "${text}" rc out)
  if(rc EQUAL 0)
    message(FATAL_ERROR "check_directives: page '${name}' extracted without the expected error '${message}'")
  endif()
  string(REGEX REPLACE "[ \n]+" " " flat "${out}")
  string(FIND "${flat}" "${message}" at)
  if(at EQUAL -1)
    message(FATAL_ERROR "check_directives: page '${name}': expected '${message}' in:\n${out}")
  endif()
endforeach()
message(STATUS "check_directives: OK")
