# Per-file ISA flags. The library is never built for the build machine's own CPU: each hand-written
# intrinsics file gets exactly the flags of its level, and dispatch decides at run time
# whether the CPU may execute it. Highway files need no flags (Highway compiles each target
# with its own attributes).
set(MOEKIT_FLAGS_avx2 "-mavx2 -mfma -mf16c -mbmi -mbmi2 -mlzcnt")
set(MOEKIT_FLAGS_avx512 "${MOEKIT_FLAGS_avx2} -mavx512f -mavx512bw -mavx512vl -mavx512dq")
set(MOEKIT_FLAGS_avx512_bf16 "${MOEKIT_FLAGS_avx512} -mavx512bf16 -mavx512vnni")
set(MOEKIT_FLAGS_amx "${MOEKIT_FLAGS_avx512_bf16} -mavx512vbmi -mamx-tile -mamx-bf16 -mamx-int8")

# moekit_isa_sources(<level> <files...>): add files compiled for <level> to MOEKIT_SOURCES.
macro(moekit_isa_sources level)
  foreach(file ${ARGN})
    set_source_files_properties(${file} PROPERTIES COMPILE_FLAGS "${MOEKIT_FLAGS_${level}}")
    list(APPEND MOEKIT_SOURCES ${file})
  endforeach()
endmacro()
