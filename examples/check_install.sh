#!/bin/sh
# Packaging check: installs a moekit build into a temporary prefix, then builds and runs
# examples/consumer.c against that prefix only.
#   check_install.sh <build dir> cmake       find_package(moekit) + moekit::moekit
#   check_install.sh <build dir> pkg-config  cc $(pkg-config --cflags --libs moekit)
set -eu

build=$(cd "$1" && pwd)
mode=$2
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/moekit-install-check.XXXXXX")
trap 'rm -rf "$work"' EXIT
prefix="$work/prefix"

cmake --install "$build" --prefix "$prefix" > "$work/install.log" || {
  cat "$work/install.log"
  echo "check_install: cmake --install failed (is the build complete?)" >&2
  exit 1
}

# A sanitized library needs its runtime in the consumer too.
sanitize=$(sed -n 's/^MOEKIT_SANITIZE:STRING=//p' "$build/CMakeCache.txt")
flags=""
if [ -n "$sanitize" ]; then flags="-fsanitize=$sanitize"; fi

case "$mode" in
  cmake)
    # Only the install prefix is searched: no build tree, no package registry. The library
    # links Highway, hwloc and OpenMP privately, so the package must not look for them.
    cmake -S "$here" -B "$work/build" -DCMAKE_PREFIX_PATH="$prefix" \
      -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_DISABLE_FIND_PACKAGE_hwy=ON -DCMAKE_DISABLE_FIND_PACKAGE_OpenMP=ON \
      -DCMAKE_DISABLE_FIND_PACKAGE_PkgConfig=ON -DCMAKE_DISABLE_FIND_PACKAGE_HWLOC=ON \
      -DCMAKE_C_FLAGS="$flags" -DCMAKE_EXE_LINKER_FLAGS="$flags"
    cmake --build "$work/build"
    # The imported target carries the library's location: no LD_LIBRARY_PATH needed.
    "$work/build/consumer"
    ;;
  pkg-config)
    pcdir=$(dirname "$(find "$prefix" -name moekit.pc | head -n 1)")
    cflags=$(PKG_CONFIG_PATH="$pcdir" pkg-config --cflags moekit)
    libs=$(PKG_CONFIG_PATH="$pcdir" pkg-config --libs moekit)
    echo "pkg-config: $cflags $libs"
    case "$libs" in
      *"$prefix"*) ;;
      *) echo "check_install: pkg-config points outside the install prefix: $libs" >&2; exit 1 ;;
    esac
    # shellcheck disable=SC2086  # word splitting of the flags is intended
    ${CC:-cc} $flags -std=c99 -Wall -Wextra -Werror "$here/consumer.c" $cflags $libs \
      -o "$work/consumer"
    LD_LIBRARY_PATH="$(dirname "$(find "$prefix" -name 'libmoekit.so' | head -n 1)")" \
      "$work/consumer"
    ;;
  *)
    echo "usage: check_install.sh <build dir> cmake|pkg-config" >&2
    exit 2
    ;;
esac
