#!/usr/bin/env bash
# The two set-up commands of the README, on a fresh Debian 12 machine (as root):
#   tools/dev.sh run   install what is missing, build Release, run moekit-run on the embedded
#                      tiny MiniMax-M2 checkpoint (and print the dispatch report)
#   tools/dev.sh test  install what is missing, build Release and an AddressSanitizer +
#                      UndefinedBehaviorSanitizer tree, run the whole test suite in both
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(g++ cmake ninja-build pkg-config libhwy-dev libhwloc-dev libdnnl-dev libopenblas-dev
          nlohmann-json3-dev libgtest-dev libgmock-dev libbenchmark-dev)
JOBS=${JOBS:-$(nproc)}

install_missing() {
  local missing=()
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "== installing: ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
}

build() {  # build <dir> [cmake args...]
  local dir=$1
  shift
  cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
  cmake --build "$dir" -j "$JOBS"
}

case "${1:-}" in
  run)
    install_missing
    build build
    build/tools/moekit-info
    echo
    build/tools/moekit-run
    ;;
  test)
    install_missing
    build build
    (cd build && ctest --output-on-failure -j "$JOBS")
    # Sanitizer tree: no benchmarks; tests only.
    build build-asan -DMOEKIT_SANITIZE=address,undefined -DMOEKIT_BUILD_BENCH=OFF
    (cd build-asan && ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
       ctest --output-on-failure -j "$JOBS")
    ;;
  *)
    echo "usage: tools/dev.sh run|test" >&2
    exit 2
    ;;
esac
