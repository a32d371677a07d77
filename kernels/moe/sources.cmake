# Source files of the moe family (included by kernels/kernels.cmake).
list(APPEND MOEKIT_SOURCES kernels/moe/fp8_convert.cc)
moekit_isa_sources(avx2 kernels/moe/fp8_convert_avx2.cc)
moekit_isa_sources(avx512 kernels/moe/fp8_convert_avx512.cc)
moekit_isa_sources(amx kernels/moe/fp8_convert_avx512vbmi.cc)
# FP8 experts: the FP8 VNNI layout (plain C++) and one microkernel file per ISA level.
list(APPEND MOEKIT_SOURCES kernels/moe/fp8_vnni.cc kernels/moe/moe_gemm_fp8_scalar.cc)
moekit_isa_sources(avx2 kernels/moe/moe_gemm_fp8_avx2.cc)
moekit_isa_sources(avx512_bf16 kernels/moe/moe_gemm_fp8_avx512bf16.cc)
moekit_isa_sources(amx kernels/moe/moe_gemm_fp8_avx512vbmi.cc kernels/moe/moe_gemm_fp8_amx.cc)
list(APPEND MOEKIT_SOURCES kernels/moe/moe_amx.cc)
moekit_isa_sources(amx kernels/moe/moe_gemm_amx.cc)
# Blockwise expert matmul: the generic pipeline and packing (plain C++), one microkernel file
# per ISA level.
list(APPEND MOEKIT_SOURCES kernels/moe/moe_pipeline.cc kernels/moe/moe_align.cc
  kernels/moe/moe_thresholds.cc
  kernels/moe/moe_gemm_scalar.cc)
moekit_isa_sources(avx2 kernels/moe/moe_gemm_avx2.cc)
moekit_isa_sources(avx512 kernels/moe/moe_gemm_avx512.cc)
moekit_isa_sources(avx512_bf16 kernels/moe/moe_gemm_avx512bf16.cc)
