# RMSNorm family: one Highway file compiled for every target (no per-file flags needed).
list(APPEND MOEKIT_SOURCES kernels/rmsnorm/rmsnorm_hwy.cc)
