#!/usr/bin/env bash
# Whether two builds of deft generate the same machine code: the SASS (sm_90) of every kernel of
# each layer, instruction for instruction (addresses and the resource comments left out), from
# two deft CLIs. No GPU needed: a change that leaves the SASS of the GPU-tested kernels as it
# was cannot have changed what those tests ran.
# Usage: scripts/sass_diff.sh OLD_CLI NEW_CLI < layers.txt
#   layers.txt: one layer a line, "desc|variant" (variant empty for the default)
# Needs nvdisasm ($DEFT_NVDISASM, or the one .ci/run fetches). Exit 1 if any layer differs.
: "${DEFT_NVDISASM:=$(cd "$(dirname "$0")/.." && pwd)/.ci/tools/nvidia-cuda-toolkit/usr/bin/nvdisasm}"
export DEFT_NVDISASM
OLD=$1; NEW=$2; shift 2
fail=0
while IFS='|' read -r desc variant; do
  [ -z "$desc" ] && continue
  args=(compile "$desc" --arch sm_90 --emit sass --no-cache)
  [ -n "$variant" ] && args+=(--variant "$variant")
  a=$($OLD "${args[@]}" 2>&1 | grep -vE "^// deft:|resources|compiled|cubin size|cache|smem layout" | sed 's@/\*[0-9a-f]*\*/@@')
  b=$($NEW "${args[@]}" 2>&1 | grep -vE "^// deft:|resources|compiled|cubin size|cache|smem layout" | sed 's@/\*[0-9a-f]*\*/@@')
  if [ "$a" == "$b" ]; then echo "SAME  ($(echo "$a" | wc -l) lines) $desc [$variant]"; else echo "DIFF  $desc [$variant]"; diff <(echo "$a") <(echo "$b") | head -8; fail=1; fi
done
exit $fail
