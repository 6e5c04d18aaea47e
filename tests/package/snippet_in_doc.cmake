# dr2net_require_snippet_in_doc(<caller> <page.md> <snippet.cmake>): fails unless the page holds
# a ```cmake block whose text is exactly the snippet file's, so the docs show what is tested.
function(dr2net_require_snippet_in_doc caller doc_file snippet_file)
  file(READ ${doc_file} doc)
  file(READ ${snippet_file} snippet)
  string(FIND "${doc}" "```cmake\n${snippet}```" at)
  if(at EQUAL -1)
    get_filename_component(name ${snippet_file} NAME)
    message(FATAL_ERROR "${caller}: ${doc_file} has no ```cmake block with exactly the text of "
                        "${name}; the page and the tested snippet must match:\n${snippet}")
  endif()
endfunction()
