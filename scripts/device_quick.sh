#!/usr/bin/env bash
# Quick device check: build, then the GPU tests matching a gtest filter (default: backward).
# Usage (on the device, from the repo root): bash scripts/device_quick.sh ['<gtest filter>']
set -uo pipefail
filter=${1:-*Backward*}
export OUT=${OUT:-/tmp/deft-out} DEFT_CACHE_DIR=/tmp/deft-cache
bash scripts/device.sh build || exit 1
t0=$(date +%s)
build/tests/deft_tests --gtest_filter="$filter" --gtest_brief=1 > "$OUT/gtest.log" 2>&1; rc=$?
echo "gtest '$filter': rc=$rc in $(( $(date +%s) - t0 )) s"
grep -cE "^\[  SKIPPED" "$OUT/gtest.log" | sed 's/^/skipped: /'
grep -E "Failure|error|FAILED|Expected|Which is|relative|differs|written" "$OUT/gtest.log" | head -60
tail -4 "$OUT/gtest.log"
exit $rc
