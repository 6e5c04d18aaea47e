# DR2NET_GIT_REPOSITORY: the URL or path of the dr2net repository you fetch from.
if(NOT DR2NET_GIT_REPOSITORY)
  message(FATAL_ERROR "set DR2NET_GIT_REPOSITORY to the URL or path of a dr2net repository")
endif()
include(FetchContent)
FetchContent_Declare(dr2net GIT_REPOSITORY ${DR2NET_GIT_REPOSITORY} GIT_TAG v0.1.0)
FetchContent_MakeAvailable(dr2net)
target_link_libraries(my_trainer PRIVATE dr2net::dr2net)
