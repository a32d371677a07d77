# Kernel sources by family: each family lists its files in kernels/<family>/sources.cmake.
# Portable (Highway) files go in MOEKIT_SOURCES directly; files of hand-written intrinsics go
# through moekit_isa_sources(<level> ...) to get exactly their level's flags.
foreach(family rmsnorm topk moe)
  include(${PROJECT_SOURCE_DIR}/kernels/${family}/sources.cmake OPTIONAL)
endforeach()
