#!/usr/bin/env bash
# Quick device check: build, then the GPU tests matching a gtest filter (default: backward).
# Usage (on the device, from the repo root): bash scripts/device_quick.sh ['<gtest filter>']
set -uo pipefail
filter=${1:-*Backward*}
OUT=${OUT:-/tmp/deft-out}; mkdir -p "$OUT"
export DEFT_CACHE_DIR=/tmp/deft-cache
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
sqlite_args=()
if [ ! -f /usr/include/sqlite3.h ] && [ -f .device/sqlite/sqlite3.h ]; then
  sqlite_args=(-DSQLite3_INCLUDE_DIR=$PWD/.device/sqlite -DSQLite3_LIBRARY=/usr/lib/x86_64-linux-gnu/libsqlite3.so.0)
fi
t0=$(date +%s)
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release "${sqlite_args[@]}" > "$OUT/configure.log" 2>&1 || { tail -30 "$OUT/configure.log"; exit 1; }
cmake --build build -j16 > "$OUT/build.log" 2>&1 || { grep -E "error|Error" "$OUT/build.log" | head -40; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
t0=$(date +%s)
build/tests/deft_tests --gtest_filter="$filter" --gtest_brief=1 > "$OUT/gtest.log" 2>&1; rc=$?
echo "gtest '$filter': rc=$rc in $(( $(date +%s) - t0 )) s"
grep -cE "^\[  SKIPPED" "$OUT/gtest.log" | sed 's/^/skipped: /'
grep -E "Failure|error|FAILED|Expected|Which is|relative|differs|written" "$OUT/gtest.log" | head -60
tail -4 "$OUT/gtest.log"
exit $rc
