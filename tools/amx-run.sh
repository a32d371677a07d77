#!/usr/bin/env bash
# Runs moekit's tests and benchmarks from a bundle made by tools/amx-bundle.sh (shipped inside it
# as run-amx.sh, and beside the archive). Needs bash and coreutils only.
#
#   ./run-amx.sh [all|tests|bench]          (default all)
#
# Beside the archive (no lib/ folder next to it), it first unpacks moekit-amx.tar.xz there (or
# into $UNPACK_DIR) and runs the copy inside. Then:
#   tests  each test binary (the ctest equivalent), one line each, then "N passed, N failed"
#   bench  bench_ceilings and the MoE benchmarks (bench_moe*), with OPENBLAS_CORETYPE=SkylakeX,
#          then one table of every result
# Logs, JSON results and the machine description go to results-<host>-<time>/ (or $RESULTS_DIR),
# packed at the end into results-<host>-<time>.tar.xz to carry back.
# Environment: BENCH_FILTER (--benchmark_filter regex), BENCH_MIN_TIME (seconds per benchmark,
# default 0.5), BENCHES (space-separated binaries instead of the default set), MOEKIT_* as usual.
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
mode=${1:-all}
case "$mode" in
  all | tests | bench) ;;
  *)
    echo "usage: $0 [all|tests|bench]" >&2
    exit 2
    ;;
esac

if [ ! -d "$here/lib" ]; then
  archive=$(ls "$here"/moekit-amx*.tar.xz 2>/dev/null | head -1)
  [ -n "$archive" ] || {
    echo "run-amx: no lib/ folder and no moekit-amx*.tar.xz beside $0" >&2
    exit 1
  }
  dest=${UNPACK_DIR:-$here}
  mkdir -p "$dest"
  echo "run-amx: unpacking $archive into $dest"
  tar -C "$dest" -xJf "$archive" || exit 1
  exec "$dest/moekit-amx/run-amx.sh" "$@"
fi

cd "$here" || exit 1
unset LD_LIBRARY_PATH LD_PRELOAD
export OPENBLAS_CORETYPE=SkylakeX
stamp=$(date -u +%Y%m%dT%H%M%SZ)
results=${RESULTS_DIR:-$here/results-$(uname -n)-$stamp}
mkdir -p "$results"

# ---- machine --------------------------------------------------------------------------------
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(uname -n), $(uname -srm)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
  echo "logical cpus: $(nproc)"
  echo "amx flags: $(grep -o 'amx[a-z_0-9]*' /proc/cpuinfo | sort -u | tr '\n' ' ')"
  echo "memory: $(grep MemTotal /proc/meminfo | awk '{printf "%.1f GiB", $2 / 1048576}')"
  echo "glibc: $(ldd --version 2>/dev/null | head -1)"
  echo "OPENBLAS_CORETYPE=$OPENBLAS_CORETYPE"
  env | grep -E '^(MOEKIT_|OMP_)' || true
  echo
  cat BUNDLE.txt
} >"$results/machine.txt"
cat "$results/machine.txt" | sed -n '1,9p'
./moekit-info >"$results/moekit-info.txt" 2>&1 && sed -n '1,40p' "$results/moekit-info.txt"
echo

# The model tests read the fixture from the path compiled into them; point it at the bundle's
# copy when that path does not exist here (and can be created).
testdata_dir=$(sed -n 's/^testdata_dir=//p' bundle.env 2>/dev/null)
if [ -n "$testdata_dir" ] && [ ! -e "$testdata_dir" ] && [ -d model/testdata ]; then
  if mkdir -p "$(dirname "$testdata_dir")" 2>/dev/null && ln -s "$here/model/testdata" "$testdata_dir"; then
    echo "run-amx: linked $testdata_dir -> $here/model/testdata (the tests' compiled-in fixture path)"
  else
    echo "run-amx: cannot create $testdata_dir; test_model will not find its fixture"
  fi
fi

# ---- tests ------------------------------------------------------------------------------------
run_tests() {
  local passed=0 failed=0 t status summary
  echo "== tests (logs in $results)"
  for t in test_*; do
    [ -x "$t" ] || continue
    if ./"$t" --gtest_brief=1 >"$results/$t.log" 2>&1; then
      status=PASS
      passed=$((passed + 1))
    else
      status=FAIL
      failed=$((failed + 1))
    fi
    summary=$(grep -hE '^\[  (PASSED|SKIPPED|FAILED) +\] [0-9]+ test' "$results/$t.log" | sed 's/  */ /g' | tr '\n' ' ')
    printf '%-28s %s  %s\n' "$t" "$status" "$summary"
    [ "$status" = FAIL ] && grep -E '^\[  FAILED  \] [A-Za-z]' "$results/$t.log" | sort -u | sed 's/^/    /'
  done
  if [ -x moekit-run ]; then
    if ./moekit-run --json --quiet >"$results/moekit-run.log" 2>&1; then
      printf '%-28s %s\n' "moekit-run (default model)" PASS
      passed=$((passed + 1))
    else
      printf '%-28s %s\n' "moekit-run (default model)" FAIL
      failed=$((failed + 1))
    fi
  fi
  echo "$passed passed, $failed failed" | tee "$results/tests-summary.txt"
  [ "$failed" -eq 0 ]
}

# ---- benchmarks -------------------------------------------------------------------------------
run_benches() {
  local benches b args
  benches=${BENCHES:-$(ls bench_ceilings bench_moe* 2>/dev/null | tr '\n' ' ')}
  echo "== benchmarks: $benches (OPENBLAS_CORETYPE=$OPENBLAS_CORETYPE)"
  for b in $benches; do
    [ -x "$b" ] || continue
    args=(--benchmark_min_time="${BENCH_MIN_TIME:-0.5}" --benchmark_out="$results/$b.json"
      --benchmark_out_format=json)
    [ -n "${BENCH_FILTER:-}" ] && args+=(--benchmark_filter="$BENCH_FILTER")
    echo "-- $b"
    ./"$b" "${args[@]}" 2>&1 | tee "$results/$b.txt"
  done
  echo
  echo "== results (time per iteration; FLOP/s and bytes/s as the benchmarks report them)"
  # Console lines: name, time, unit, cpu, unit, iterations, then key=value counters and a label.
  cat $(for b in $benches; do echo "$results/$b.txt"; done) 2>/dev/null | awk '
    /^BM_/ && $2 == "ERROR" { print; next }
    /^BM_/ {
      flops = "-"; bw = "-"; extra = ""
      for (i = 7; i <= NF; ++i) {
        if ($i ~ /^FLOP\/s=/) flops = substr($i, 8)
        else if ($i ~ /^GFLOPs=/) flops = sprintf("%.4gG/s", substr($i, 8))
        else if ($i ~ /^bytes_per_second=/) bw = substr($i, 18)
        else if ($i ~ /^weight_Bps=/) bw = substr($i, 12) "/s"
        else extra = extra " " $i
      }
      printf "%-58s %10s %-3s %12s %12s %s\n", $1, $2, $3, flops, bw, extra
      next
    }
  ' | (printf '%-58s %14s %12s %12s %s\n' benchmark time FLOP/s bytes/s other; cat) |
    tee "$results/bench-table.txt"
}

status=0
case "$mode" in
  tests) run_tests || status=1 ;;
  bench) run_benches ;;
  all)
    run_tests || status=1
    echo
    run_benches
    ;;
esac

tar -C "$(dirname "$results")" -cJf "$results.tar.xz" "$(basename "$results")" &&
  echo "run-amx: results in $results.tar.xz"
exit $status
