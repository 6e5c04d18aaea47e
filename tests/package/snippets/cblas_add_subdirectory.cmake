set(DR2NET_USE_CBLAS ON)                     # before adding dr2net
add_subdirectory(third_party/dr2net)
target_link_libraries(my_trainer PRIVATE dr2net::dr2net)
if(TARGET dr2net::cblas)                     # OpenBLAS found (Debian: libopenblas-dev)
  target_link_libraries(my_trainer PRIVATE dr2net::cblas)
endif()
