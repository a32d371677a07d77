# Top-k routing: a portable file, and one file of hand-written intrinsics per ISA level; all three
# share the algorithm in topk_route-inl.h.
list(APPEND MOEKIT_SOURCES kernels/topk/topk_scalar.cc)
moekit_isa_sources(avx2 kernels/topk/topk_avx2.cc)
moekit_isa_sources(avx512 kernels/topk/topk_avx512.cc)
