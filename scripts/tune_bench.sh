#!/usr/bin/env bash
# Tunes the benchmark's fp16 layers (scripts/bench_layers_f16.txt) with deft tune, sigma = 2.
# Usage: bash scripts/tune_bench.sh [--db PATH]
set -euo pipefail
mapfile -t layers < "$(dirname "$0")/bench_layers_f16.txt"
build/tools/deft tune "${layers[@]}" --sigma 2 --seconds 0.05 "$@"
