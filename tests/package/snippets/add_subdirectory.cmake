add_subdirectory(third_party/dr2net)
target_link_libraries(my_trainer PRIVATE dr2net::dr2net)
