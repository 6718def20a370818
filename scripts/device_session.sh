#!/usr/bin/env bash
# One device call that does a session's GPU work in order of value, and keeps within the
# device tool's limit of 8 files back: logs go to $LOGS, tarred into $OUT/logs.tgz at the end
# (and whenever a step finishes), the report files are copied to $OUT as they appear.
# Usage (on the device, from the repo root): bash scripts/device_session.sh STEP...
#   STEP: build | wgmma (the forward wgmma GPU tests; WGMMA_FILTER) | sweep (wgmma tiles) | tests (ctest + pytest)
#         | gputests (GPU tests only) | pytest | bench (forward) | bwd (bench_backward.py) | ncu
#         | train (examples/train_resnet_dcn.py, batch 256 and 128) | window (the staging=window
#         sweep at sigma 0.5, 2, 8) | profile (scripts/profile_train.py --cpu, both ops)
#         | decision (scripts/stats_decision.py: do the statistics change the tuner's pick?)
#         | host (scripts/host_overhead.py: the Python op's host time per call)
#         | graphs (the training example with --graphs) | profbwd (scripts/profile_bwd.py) | proffwd (the same, forward only)
#         | gintime (scripts/time_gin_local.py $GIN_ARGS) | tunebench (scripts/tune_bench.sh) | tunemodel (deft tune examples/resnet50_dcn.json, then deft_load_tuned)
#         | tuneinspect (deft tune + deft inspect of TUNE_DESCS: every candidate's time or error)
#         | tbench (scripts/transpose_bench.cu: transpose tiles against a copy)
#         | sass (SASS_DESC/SASS_VARIANT's SASS as the device compiles it) | ncubwd (ncu of one backward kernel, NCU_PASS weight or data) | ncudw (ncu of the depthwise forward, dw512 fp16) | sweepbwd (grad-weight wgmma tiles, scripts/sweep_bwd.py --family $SWEEP_FAMILY:
#           wgmma, or ws for the warp-specialised ones)
#   Environment: BWD_DTYPES, BWD_CASES, BWD_DATA_VARIANT, BWD_LAYOUTS (bwd: bench_backward.py's --dtypes,
#   --cases, --backward-data-variant, --layouts (nchw,nhwc adds the NHWC rows); a subset leaves the BENCHMARKS.md section as it was, the
#   logs keep its table), SWEEP_CASES, SWEEP_DTYPES, SWEEP_FAMILY (wgmma | ws | window | data), SWEEP_DTYPE (sweepbwd: fp16 or fp32_tf32), SWEEP_LAYOUT (sweepbwd: nchw or nhwc), SWEEP_SHAPES (sweepbwd: a cases file), SWEEP_TAG (sweepbwd: log name suffix), SWEEP_SIGMAS,
#   SWEEP_TIMEOUT (sweep), GPU_TIMEOUT (gputests; seconds before a hung run is killed), NCU_VARIANT (ncu, ncubwd), NCU_PASS and NCU_CASES (ncubwd), GPU_FILTER (gputests: a gtest filter), PROF_CASES, PROF_DTYPES, PROF_LAYOUTS, PROF_TAG (profbwd, proffwd; PROF_TAG: log name suffix)
set -uo pipefail
OUT=${OUT:-/tmp/deft-out}; LOGS=/tmp/deft-logs; mkdir -p "$OUT" "$LOGS"
# both benchmarks rewrite their sections of this copy: made once, so that a later invocation
# in the same call keeps what an earlier one's benchmark wrote
[ -f "$LOGS/BENCHMARKS.md" ] || cp BENCHMARKS.md "$LOGS/BENCHMARKS.md"
export PYTHONUNBUFFERED=1 DEFT_CACHE_DIR=/tmp/deft-cache
pack() { tar -czf "$OUT/logs.tgz" -C "$LOGS" . 2>/dev/null; }
t00=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t00 )) s] $*"; }
rc=0
for step in "$@"; do
  case $step in
    build)
      nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader | tee "$LOGS/gpu.txt"
      OUT=$LOGS bash scripts/device.sh build || { pack; exit 1; } ;;
    wgmma)
      # the forward wgmma GPU suites only: '*Wgmma*' also takes the NVRTC-heavy Codegen.Wgmma*
      # CPU suites and the backward ones (401 s in session 20); WGMMA_FILTER widens it
      build/tests/deft_tests --gtest_filter="${WGMMA_FILTER:-*GpuForwardWgmma*}" --gtest_brief=1 > "$LOGS/wgmma.log" 2>&1; r=$?
      stamp "wgmma tests rc=$r"; [ $r -eq 0 ] || rc=1
      grep -E "Failure|error|Expected|Which is|relative|not finite|FAILED|PASSED" "$LOGS/wgmma.log" | head -40 ;;
    sweep)
      timeout "${SWEEP_TIMEOUT:-300}" python3 scripts/sweep.py --lib build/libdeft.so --family "${SWEEP_FAMILY:-wgmma}" \
        --dtypes "${SWEEP_DTYPES:-fp16}" --sigmas "${SWEEP_SIGMAS:-2}" \
        --cases "${SWEEP_CASES:-resnet_res4,maskrcnn_res4,dense512,deft_64,stride2}" \
        --layouts nhwc,nchw > "$LOGS/sweep.log" 2>&1; stamp "sweep rc=$?"
      cat "$LOGS/sweep.log" | cut -c1-150 ;;
    tests)
      (cd build && ctest --output-on-failure -j4 --timeout 600) > "$LOGS/ctest.log" 2>&1 || rc=1
      stamp "ctest rc=$rc"; grep -E "tests passed|tests failed|\(Failed\)|\*\*\*" "$LOGS/ctest.log" | tail -15
      build/tests/deft_tests --gtest_filter='*Gpu*:*GPU*' --gtest_brief=1 > "$LOGS/gpu_tests.log" 2>&1
      echo "gpu tests rc=$?, skipped: $(grep -cE '^\[  SKIPPED' "$LOGS/gpu_tests.log")"; tail -3 "$LOGS/gpu_tests.log"
      python3 -m pytest -q -p no:cacheprovider python/tests > "$LOGS/pytest.log" 2>&1; r=$?
      stamp "pytest rc=$r"; tail -4 "$LOGS/pytest.log"; [ $r -eq 0 ] || rc=1 ;;
    bench)
      python3 bench/bench.py --lib build/libdeft.so --out "$LOGS/bench" \
        --benchmarks-md "$LOGS/BENCHMARKS.md" > "$LOGS/bench.log" 2>&1; stamp "bench rc=$?"
      cp "$LOGS/BENCHMARKS.md" "$LOGS/bench/results.json" "$LOGS/bench/bench.png" "$OUT/" 2>/dev/null
      tail -50 "$LOGS/bench.log" ;;
    bwd)
      python3 bench/bench_backward.py --lib build/libdeft.so --out "$LOGS/bwd" \
        ${BWD_DTYPES:+--dtypes "$BWD_DTYPES"} ${BWD_CASES:+--cases "$BWD_CASES"} \
        ${BWD_DATA_VARIANT:+--backward-data-variant "$BWD_DATA_VARIANT"} ${BWD_LAYOUTS:+--layouts "$BWD_LAYOUTS"} \
        --benchmarks-md "$LOGS/BENCHMARKS.md" > "$LOGS/bench_backward.log" 2>&1
      stamp "bench_backward rc=$?"; cp "$LOGS/BENCHMARKS.md" "$OUT/"; tail -30 "$LOGS/bench_backward.log" ;;
    train)  # the training example at batch 256 and 128 (issue 6: 2x at 256, host-bound at 128)
      # TRAIN_BATCHES (default "256 128"), TRAIN_ARGS (more arguments, e.g. --channels-last),
      # TRAIN_TAG (log name suffix)
      for b in ${TRAIN_BATCHES:-256 128}; do
        python3 examples/train_resnet_dcn.py --batch $b ${TRAIN_ARGS:-} --json "$LOGS/train$b${TRAIN_TAG:-}.json" \
          > "$LOGS/train-b$b${TRAIN_TAG:-}.log" 2>&1
        stamp "train batch $b ${TRAIN_ARGS:-} rc=$?"; tail -8 "$LOGS/train-b$b${TRAIN_TAG:-}.log"
      done ;;
    graphs)  # the training example with the model as CUDA graphs (both ops), batch 128 and 32
      for b in 128 32; do
        python3 examples/train_resnet_dcn.py --graphs --batch $b --json "$LOGS/train-graphs$b.json" \
          > "$LOGS/train-graphs-b$b.log" 2>&1
        stamp "train --graphs batch $b rc=$?"; tail -8 "$LOGS/train-graphs-b$b.log"
      done ;;
    window)  # the staging=window sweep at three offset spreads (issue 5's decision)
      SWEEP_FAMILY=window SWEEP_SIGMAS=0.5,2,8 SWEEP_CASES=${SWEEP_CASES:-dense512,resnet_res4,deft_64} \
        SWEEP_DTYPES=${SWEEP_DTYPES:-fp16} bash "$0" sweep; cp "$LOGS/sweep.log" "$LOGS/sweep-window.log" ;;
    decision)  # issue 5: deft tune --window at sigma 0.5 and 8, each pick timed on both spreads
      # DECISION_ARGS: more arguments (e.g. --pass backward_data --no-window --shapes ...),
      # DECISION_TAG: log name suffix
      timeout 400 python3 scripts/stats_decision.py --cases "${DECISION_CASES:-dense512,resnet_res4}" \
        ${DECISION_ARGS:-} > "$LOGS/stats-decision${DECISION_TAG:-}.log" 2>&1; stamp "stats decision rc=$?"
      tail -24 "$LOGS/stats-decision${DECISION_TAG:-}.log" ;;
    profile)  # where a batch-128 training step's time goes, GPU and host, for both ops
      for op in ${PROFILE_OPS:-deft torchvision}; do
        timeout 150 python3 scripts/profile_train.py --op $op --cpu > "$LOGS/profile-train-$op.txt" 2>&1
        stamp "profile $op rc=$?"; grep "===" "$LOGS/profile-train-$op.txt"
      done ;;
    host)  # host time per call of each layer of the Python op's stack (scripts/host_overhead.py)
      timeout 200 python3 scripts/host_overhead.py --profile > "$LOGS/host-overhead.txt" 2>&1
      stamp "host overhead rc=$?"; head -20 "$LOGS/host-overhead.txt" ;;
    proffwd)  # per-kernel times of the forward alone (scripts/profile_bwd.py --forward-only), both layouts
      for lay in ${PROF_LAYOUTS:-nchw nhwc}; do
        timeout 200 python3 scripts/profile_bwd.py "${PROF_CASES:-deft_64,resnet_res4,maskrcnn_res4,dense512,dw512,dw512_n1,stride2}" \
          --dtypes "${PROF_DTYPES:-fp16,fp32_tf32}" --layout $lay --forward-only > "$LOGS/profile-fwd-$lay${PROF_TAG:-}.txt" 2>&1
        stamp "profile_fwd $lay rc=$?"; cut -c1-150 "$LOGS/profile-fwd-$lay${PROF_TAG:-}.txt" | grep -v Warn | tail -40
      done ;;
    profbwd)  # per-kernel times of forward + backward (scripts/profile_bwd.py), fp16, both layouts
      for lay in ${PROF_LAYOUTS:-nchw nhwc}; do
        timeout 200 python3 scripts/profile_bwd.py "${PROF_CASES:-dense512,resnet_res4,dw512,stride2}" \
          --dtypes "${PROF_DTYPES:-fp16}" --layout $lay > "$LOGS/profile-bwd-$lay${PROF_TAG:-}.txt" 2>&1
        stamp "profile_bwd $lay rc=$?"; cut -c1-150 "$LOGS/profile-bwd-$lay${PROF_TAG:-}.txt" | grep -v Warn | tail -40
      done ;;
    sweepbwd)  # grad-weight tiles on wgmma against the WMMA kernel (scripts/sweep_bwd.py)
      timeout 200 python3 scripts/sweep_bwd.py "${SWEEP_CASES:-dense512,resnet_res4,maskrcnn_res4,deft_64,stride2}" \
        --family "${SWEEP_FAMILY:-wgmma}" ${SWEEP_DTYPE:+--dtype "$SWEEP_DTYPE"} ${SWEEP_LAYOUT:+--layout "$SWEEP_LAYOUT"} \
        ${SWEEP_SHAPES:+--shapes "$SWEEP_SHAPES"} ${SWEEP_SIGMAS:+--sigmas "$SWEEP_SIGMAS"} \
        > "$LOGS/sweep-bwd-${SWEEP_FAMILY:-wgmma}${SWEEP_TAG:-}.log" 2>&1
      stamp "sweep_bwd rc=$?"; cut -c1-150 "$LOGS/sweep-bwd-${SWEEP_FAMILY:-wgmma}${SWEEP_TAG:-}.log" ;;
    pytest)  # the Python package's tests alone
      python3 -m pytest -q -p no:cacheprovider python/tests > "$LOGS/pytest.log" 2>&1; r=$?
      stamp "pytest rc=$r"; tail -4 "$LOGS/pytest.log"; [ $r -eq 0 ] || rc=1 ;;
    gputests)  # the GPU tests alone (one process), no CPU tests, no pytest
      timeout "${GPU_TIMEOUT:-450}" build/tests/deft_tests --gtest_filter="${GPU_FILTER:-*Gpu*:*GPU*}" \
        > "$LOGS/gpu_tests.log" 2>&1; r=$?
      stamp "gpu tests rc=$r, skipped: $(grep -cE '^\[  SKIPPED' "$LOGS/gpu_tests.log")"; [ $r -eq 0 ] || rc=1
      grep -E "Failure|Expected|FAILED" "$LOGS/gpu_tests.log" | head -20; tail -3 "$LOGS/gpu_tests.log" ;;
    ncu)  # hardware counters of the default forward kernel on dense512 and resnet_res4 (fp16 nhwc)
      # NCU_VARIANT (optional): a variant text to profile instead of the default
      for desc in "deform_conv2d n=16 c=512 h=32 w=32 k=512 r=3 s=3 pad=1 mask=1 dtype=f16 layout=nhwc" \
                  "deform_conv2d n=32 c=256 h=14 w=14 k=256 r=3 s=3 pad=1 mask=1 dtype=f16 layout=nhwc"; do
        timeout 120 ncu --clock-control none --kernel-name deft_deform_conv2d_forward --launch-skip 2 \
          --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis \
          --section WarpStateStats --section Occupancy --section LaunchStats \
          python3 scripts/profile_one.py "$desc" ${NCU_VARIANT:+"$NCU_VARIANT"} >> "$LOGS/ncu.txt" 2>&1
      done
      stamp "ncu done"
      grep -E "Duration|Throughput|Hit Rate|Achieved Occupancy|Registers Per|Stall|Warp Cycles Per Issued|L1/TEX Cache Throughput|L2 Cache Throughput|DRAM Throughput|Shared Memory Configuration Size|Dynamic Shared Memory Per Block" "$LOGS/ncu.txt" | head -60 ;;
    benchdw)  # the forward benchmark's depthwise rows alone (no torchvision, BENCHMARKS.md untouched)
      python3 bench/bench.py --lib build/libdeft.so --out "$LOGS/benchdw${BENCH_TAG:-}" --cases dw512,dw512_n1 \
        --sigmas 2 --no-torchvision > "$LOGS/benchdw${BENCH_TAG:-}.log" 2>&1; stamp "bench dw rc=$?"
      grep -E "^\| dw512" "$LOGS/benchdw${BENCH_TAG:-}/BENCHMARKS.section.md" | cut -d'|' -f2-8 | head -12 ;;
    ncudw)  # hardware counters of the depthwise forward on dw512 fp16, nhwc and nchw (NCU_VARIANT)
      for lay in ${NCU_LAYOUTS:-nhwc nchw}; do
        timeout 120 ncu --clock-control none --kernel-name deft_deform_conv2d_forward --launch-skip 2 \
          --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis \
          --section WarpStateStats --section SchedulerStats --section Occupancy --section LaunchStats \
          --section ComputeWorkloadAnalysis --section SourceCounters --section MemoryWorkloadAnalysis_Tables \
          --import-source no -o "/tmp/ncu-dw-$lay" -f \
          python3 scripts/profile_one.py "deform_conv2d n=16 c=512 h=32 w=32 k=512 r=3 s=3 pad=1 groups=512 mask=1 dtype=f16 layout=$lay" \
          ${NCU_VARIANT:+"$NCU_VARIANT"} > "$LOGS/ncu-dw-run-$lay.txt" 2>&1
        stamp "ncu dw $lay rc=$?"
        ncu -i "/tmp/ncu-dw-$lay.ncu-rep" > "$LOGS/ncu-dw-$lay.txt" 2>&1
        ncu -i "/tmp/ncu-dw-$lay.ncu-rep" --page source --print-source sass --csv > "$LOGS/ncu-dw-sass-$lay.csv" 2>&1
        grep -E "Duration|Throughput|Hit Rate|Registers Per|Warp Cycles Per Issued|Issue Slots|No Eligible|Achieved Occupancy|Theoretical Occupancy|Pipe|Wavefronts|Sectors/Req|Bank|Mem Busy|Max Bandwidth|Mem Pipes" "$LOGS/ncu-dw-$lay.txt" | head -45
        python3 scripts/ncu_stalls.py "$LOGS/ncu-dw-sass-$lay.csv" --top 12 2>&1 | head -20
      done ;;
    ncuslices)  # issue 5 / round B23-B25: the depthwise grad input's L2 reductions at sigma 0.5
      # and 8 (total, per-slice max and mean: do small offsets camp on a few L2 slices?)
      for sg in 0.5 8; do
        DEFT_PROFILE_PASS=data DEFT_PROFILE_SIGMA=$sg timeout 120 ncu --clock-control none \
          --kernel-name deft_deform_conv2d_backward_data --launch-skip 2 --launch-count 1 \
          --metrics gpu__time_duration.sum,lts__t_sectors_op_red.sum,lts__t_sectors_op_red.max,lts__t_sectors_op_red.avg,lts__t_sectors.max,lts__t_sectors.avg,lts__throughput.avg.pct_of_peak_sustained_elapsed \
          python3 scripts/profile_one_bwd.py ${NCU_CASES:-dw512} fp16 > "$LOGS/ncu-slices-s$sg.txt" 2>&1
        stamp "ncu slices sigma $sg rc=$?"; grep -E "duration|lts__" "$LOGS/ncu-slices-s$sg.txt"
      done ;;
    ncubwd)  # hardware counters of one backward kernel: NCU_PASS weight (default) or data,
      # NCU_CASES, NCU_VARIANT (that pass's variant)
      for cs in ${NCU_CASES:-dense512 resnet_res4}; do
        DEFT_PROFILE_PASS=${NCU_PASS:-weight} timeout 150 ncu --clock-control none \
          --kernel-name deft_deform_conv2d_backward_${NCU_PASS:-weight} \
          --launch-skip 2 --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis \
          --section WarpStateStats --section SchedulerStats --section Occupancy --section LaunchStats \
          --section SourceCounters --section MemoryWorkloadAnalysis_Tables \
          --import-source no -o "/tmp/ncu-bwd-$cs" -f \
          python3 scripts/profile_one_bwd.py $cs fp16 ${NCU_VARIANT:+"$NCU_VARIANT"} > "$LOGS/ncu-bwd-run-$cs.txt" 2>&1
        stamp "ncu bwd $cs rc=$?"
        ncu -i "/tmp/ncu-bwd-$cs.ncu-rep" > "$LOGS/ncu-bwd-$cs.txt" 2>&1
        # per-SASS-instruction stall samples: which warps (producer or consumer code) wait where
        ncu -i "/tmp/ncu-bwd-$cs.ncu-rep" --page source --print-source sass --csv > "$LOGS/ncu-bwd-sass-$cs.csv" 2>&1
        grep -E "Duration|Throughput|Hit Rate|Registers Per|Stall|Warp Cycles Per Issued|Issue Slots|Eligible|No Eligible|Active Warps" "$LOGS/ncu-bwd-$cs.txt" | head -40
      done ;;
    gintime)  # scripts/time_gin_local.py: GIN_ARGS (cases, --kernels, --flush, --sigmas=, --layouts=),
      # GIN_TAG, GIN_PDL (DEFT_PDL for the run; default 0, as --kernels needs)
      DEFT_PDL=${GIN_PDL:-0} timeout 300 python3 scripts/time_gin_local.py ${GIN_ARGS:-} > "$LOGS/time-gin-local${GIN_TAG:-}.log" 2>&1
      stamp "time_gin_local ${GIN_ARGS:-} rc=$?"; grep "^|" "$LOGS/time-gin-local${GIN_TAG:-}.log" ;;
    tunebench)  # issue 5: every fp16 forward layer of bench/shapes.json tuned (scripts/tune_bench.sh,
      # L2 flushed, every candidate), the closing table: default, tuned, speedup, variant
      timeout ${TUNEBENCH_TIMEOUT:-400} bash scripts/tune_bench.sh --db "$LOGS/tunebench.db" > "$LOGS/tune-bench.log" 2>&1
      stamp "tune bench rc=$?"; tail -22 "$LOGS/tune-bench.log" ;;
    tunemodel)  # issue 5: deft tune on the ResNet-50-DCN model file with a cold cache (<= 3 min),
      # then a fresh process loads every layer from the database (<= 20 ms, no NVRTC)
      rm -rf /tmp/deft-cache-model; t0m=$(date +%s)
      DEFT_CACHE_DIR=/tmp/deft-cache-model timeout ${TUNEMODEL_TIMEOUT:-400} build/tools/deft tune examples/resnet50_dcn.json \
        --db "$LOGS/resnet50.db" > "$LOGS/tune-resnet50-dcn.log" 2>&1; r=$?
      echo "deft tune examples/resnet50_dcn.json: rc=$r, $(( $(date +%s) - t0m )) s wall (cold cache)" | tee -a "$LOGS/tune-resnet50-dcn.log"
      tail -14 "$LOGS/tune-resnet50-dcn.log"
      DEFT_CACHE_DIR=/tmp/deft-cache-model build/examples/deft_load_tuned examples/resnet50_dcn.json \
        --db "$LOGS/resnet50.db" > "$LOGS/load-tuned-resnet50-dcn.log" 2>&1
      stamp "load tuned rc=$?"; tail -12 "$LOGS/load-tuned-resnet50-dcn.log" ;;
    tuneinspect)  # deft tune, then deft inspect (every candidate's time or error), per layer:
      # TUNE_DESCS (descriptions separated by ';'), TUNE_SIGMA (default 2), TUNE_PASSES
      # (one pass; default: the description's own)
      IFS=';' read -ra descs <<< "${TUNE_DESCS:?set TUNE_DESCS}"
      for desc in "${descs[@]}"; do
        build/tools/deft tune "$desc" --sigma "${TUNE_SIGMA:-2}" ${TUNE_PASSES:+--passes "$TUNE_PASSES"} \
          --db "$LOGS/tuneinspect.db" >> "$LOGS/tuneinspect.log" 2>&1; r=$?
        idesc="$desc"; [ -n "${TUNE_PASSES:-}" ] && idesc="$desc pass=$TUNE_PASSES"
        build/tools/deft inspect "$idesc" --db "$LOGS/tuneinspect.db" >> "$LOGS/tuneinspect.log" 2>&1
        stamp "tune $desc rc=$r"
      done
      tail -60 "$LOGS/tuneinspect.log" ;;
    sass)  # SASS of one kernel as the device's NVRTC compiles it: SASS_DESC, SASS_VARIANT
      DEFT_NVDISASM=${DEFT_NVDISASM:-/usr/local/cuda/bin/nvdisasm} build/tools/deft compile "$SASS_DESC" \
        ${SASS_VARIANT:+--variant "$SASS_VARIANT"} --no-cache --emit sass > "$LOGS/sass.txt" 2>&1
      stamp "sass rc=$? lines=$(wc -l < "$LOGS/sass.txt") md5=$(md5sum < "$LOGS/sass.txt" | cut -c1-12)"
      ls -l /usr/local/cuda/lib64/libnvrtc.so* 2>/dev/null | head -3 ;;
    tbench)  # scripts/transpose_bench.cu: the nchw -> nhwc transpose's tile shapes against a copy
      nvcc -O3 -arch=sm_90 -std=c++17 scripts/transpose_bench.cu -o /tmp/transpose_bench > "$LOGS/transpose-bench.log" 2>&1 \
        && timeout 120 /tmp/transpose_bench >> "$LOGS/transpose-bench.log" 2>&1
      stamp "transpose bench rc=$?"; cat "$LOGS/transpose-bench.log" ;;
    *) echo "unknown step $step"; rc=1 ;;
  esac
  pack
done
exit $rc
