#!/usr/bin/env bash
# Packs a Release build's test and benchmark binaries, with every shared library they load from
# the Debian packages of the build machine, into one self-contained xz archive, for running on
# an AMX machine that has no packages and no network (any x86-64 Linux with a glibc at least as
# new as the build machine's).
#
#   tools/amx-bundle.sh [BUILD_DIR] [OUT_DIR]      (defaults: build, bundle-amx)
#
# Produces OUT_DIR/moekit-amx.tar.xz and OUT_DIR/run-amx.sh. On the AMX machine:
#   ./run-amx.sh            unpacks the archive beside itself and runs the tests, the MoE
#                           benchmarks and the ceilings (tools/amx-run.sh, also inside the archive)
# Layout of the archive: moekit-amx/{test_*, bench_*, moekit-info, moekit-run, run-amx.sh,
# lib/*.so*, model/testdata, BUNDLE.txt}. Binaries carry RPATH $ORIGIN/lib and the libraries
# RPATH $ORIGIN, so they load from the bundle whatever LD_LIBRARY_PATH says; glibc itself (libc,
# libm, libpthread, libdl, librt, ld-linux) comes from the target machine.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
build=$(cd "${1:-$repo/build}" && pwd)
out=${2:-$repo/bundle-amx}
name=moekit-amx
max_bytes=$((60 * 1024 * 1024))

die() {
  echo "amx-bundle: $*" >&2
  exit 1
}

command -v patchelf >/dev/null || die "patchelf is needed (Debian package patchelf)"
[ -f "$build/CMakeCache.txt" ] || die "$build is not a CMake build directory"
grep -q '^CMAKE_BUILD_TYPE:STRING=Release$' "$build/CMakeCache.txt" ||
  die "$build is not a Release build (benchmarks from it would mislead)"
if grep -q '^MOEKIT_SANITIZE:STRING=.\+' "$build/CMakeCache.txt"; then
  die "$build is a sanitizer build"
fi

is_elf() { [ "$(head -c 4 "$1" 2>/dev/null | od -An -c | tr -d ' ')" = '177ELF' ]; }

# Libraries the target machine's glibc provides; everything else travels.
is_glibc() {
  case "$(basename "$1")" in
    linux-vdso.so* | ld-linux*.so* | libc.so* | libm.so* | libpthread.so* | libdl.so* | \
      librt.so* | libresolv.so* | libutil.so* | libmvec.so*) return 0 ;;
  esac
  return 1
}

stage_root=$(mktemp -d)
trap 'rm -rf "$stage_root"' EXIT
stage=$stage_root/$name
mkdir -p "$stage/lib"

# ---- binaries ------------------------------------------------------------------------------
bins=()
while IFS= read -r f; do
  is_elf "$f" && bins+=("$f")
done < <(find "$build" -path '*/CMakeFiles' -prune -o -type f -perm -u+x \
  \( -name 'test_*' -o -name 'bench_*' -o -name 'moekit-info' -o -name 'moekit-run' \) -print |
  sort)
[ ${#bins[@]} -gt 0 ] || die "no test or benchmark binaries in $build (build them first)"
for f in "${bins[@]}"; do
  base=$(basename "$f")
  [ -e "$stage/$base" ] && die "two binaries named $base"
  cp "$f" "$stage/$base"
  chmod u+w "$stage/$base"
done

# ---- shared libraries (ldd gives the whole dependency closure) -------------------------------
declare -A libs=()
for f in "${bins[@]}"; do
  while read -r soname arrow path _; do
    [ "$arrow" = "=>" ] || continue
    [ "$path" = "not" ] && die "$(basename "$f") needs $soname, which is not found here"
    is_glibc "$soname" && continue
    libs[$soname]=$path
  done < <(env -u LD_LIBRARY_PATH ldd "$f")
done
for soname in "${!libs[@]}"; do
  cp -L "${libs[$soname]}" "$stage/lib/$soname"
  chmod u+w "$stage/lib/$soname"
done

# ---- RPATH: DT_RPATH (not RUNPATH) so it also covers libraries loaded by libraries -----------
for f in "${bins[@]}"; do
  patchelf --force-rpath --set-rpath '$ORIGIN/lib' "$stage/$(basename "$f")"
done
for soname in "${!libs[@]}"; do
  patchelf --force-rpath --set-rpath '$ORIGIN' "$stage/lib/$soname"
done

# ---- data, scripts, manifest ------------------------------------------------------------------
testdata=$(sed -n 's/^MOEKIT_MODEL_TESTDATA_DIR:INTERNAL=//p' "$build/CMakeCache.txt")
if [ -n "$testdata" ] && [ -d "$testdata" ]; then
  mkdir -p "$stage/model"
  cp -r "$testdata" "$stage/model/testdata"
fi
cp "$repo/tools/amx-run.sh" "$stage/run-amx.sh"
chmod +x "$stage/run-amx.sh"
{
  echo "moekit AMX bundle"
  echo "commit: $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)$(
    git -C "$repo" diff --quiet HEAD 2>/dev/null || echo ' (working tree had changes)')"
  echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -n), $(ldd --version | head -1)"
  echo "build dir: $build"
  echo "compiled-in testdata dir: ${testdata:-none}"
  echo "binaries: $(cd "$stage" && ls test_* bench_* moekit-* 2>/dev/null | tr '\n' ' ')"
  echo "libraries:"
  for soname in $(printf '%s\n' "${!libs[@]}" | sort); do
    echo "  $soname <- ${libs[$soname]}"
  done
} >"$stage/BUNDLE.txt"
echo "testdata_dir=${testdata}" >"$stage/bundle.env"

# ---- check: every library resolves inside the bundle with an empty environment ----------------
for f in "$stage"/test_* "$stage"/bench_* "$stage"/moekit-* "$stage"/lib/*.so*; do
  [ -f "$f" ] && is_elf "$f" || continue
  while read -r soname arrow path _; do
    [ "$arrow" = "=>" ] || continue
    is_glibc "$soname" && continue
    case "$path" in
      "$stage"/lib/*) ;;
      *) die "$(basename "$f"): $soname resolves to $path, outside the bundle" ;;
    esac
  done < <(env -i ldd "$f")
done

# ---- archive ------------------------------------------------------------------------------------
mkdir -p "$out"
archive=$out/$name.tar.xz
XZ_OPT="-9 -T0" tar -C "$stage_root" -cJf "$archive.tmp" "$name"
mv "$archive.tmp" "$archive"
cp "$repo/tools/amx-run.sh" "$out/run-amx.sh"
chmod +x "$out/run-amx.sh"
bytes=$(stat -c %s "$archive")
echo "amx-bundle: ${#bins[@]} binaries, ${#libs[@]} libraries, $(du -sh "$stage" | cut -f1) unpacked"
echo "amx-bundle: $archive ($((bytes / 1024 / 1024)) MiB) and $out/run-amx.sh"
[ "$bytes" -le "$max_bytes" ] || die "the archive is larger than 60 MiB"
