#!/usr/bin/env bash
# One call on the GPU machine: build, GPU tests, example, benchmark. Prints a short table last.
# Usage (on the device, from the repo root): bash scripts/device.sh [build|tests|bench|all] [bench args...]
# (build: configure and build only)
set -uo pipefail
what=${1:-all}; shift || true
OUT=${OUT:-/tmp/deft-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 DEFT_CACHE_DIR=/tmp/deft-cache
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/gpu.txt"
sqlite_args=()
if [ ! -f /usr/include/sqlite3.h ] && [ -f .device/sqlite/sqlite3.h ]; then
  sqlite_args=(-DSQLite3_INCLUDE_DIR=$PWD/.device/sqlite -DSQLite3_LIBRARY=/usr/lib/x86_64-linux-gnu/libsqlite3.so.0)
fi
t0=$(date +%s)
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release "${sqlite_args[@]}" > "$OUT/configure.log" 2>&1 || { tail -30 "$OUT/configure.log"; exit 1; }
cmake --build build -j16 > "$OUT/build.log" 2>&1 || { grep -E "error|Error" "$OUT/build.log" | head -40; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
rc=0
if [ "$what" = tests ] || [ "$what" = all ]; then
  t0=$(date +%s)
  (cd build && ctest --output-on-failure -j4 --timeout 600) > "$OUT/ctest.log" 2>&1 || rc=1
  echo "ctest: $(( $(date +%s) - t0 )) s, rc=$rc"
  grep -E "tests passed|tests failed|Failed|\*\*\*" "$OUT/ctest.log" | tail -25
  build/tests/deft_tests --gtest_filter='*Gpu*:*GPU*' --gtest_brief=1 > "$OUT/gpu_tests.log" 2>&1; echo "gpu tests rc=$?"
  grep -cE "^\[  SKIPPED" "$OUT/gpu_tests.log" | sed 's/^/gpu tests skipped: /'
  tail -5 "$OUT/gpu_tests.log"
  build/examples/deft_example_forward 2>&1 | tail -5
  python3 -m pytest -q -p no:cacheprovider python/tests > "$OUT/pytest.log" 2>&1; echo "pytest rc=$?"
  tail -15 "$OUT/pytest.log"
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  python3 bench/bench.py --lib build/libdeft.so --out "$OUT/bench" --benchmarks-md "$OUT/BENCHMARKS.md" "$@" 2>&1 | tee "$OUT/bench.log" | tail -60
fi
exit $rc
