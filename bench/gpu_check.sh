#!/usr/bin/env bash
# The GPU check of issue 12, in one device call of at most 8 minutes (stage limits add up to 465 s):
#   1. the GPU tests (kernels at real sizes: PatchMatch 250x250x256, AMSA's deformable convolutions,
#      tensors beyond 2^31 elements) and the rest of the suite's GPU-marked tests;
#   2. compute-sanitizer memcheck and racecheck on small PatchMatch and deformable launches;
#   3. timings side by side, appended to bench/results/results.csv with the device name: one PatchMatch
#      step (Triton fp32/bf16 vs the PyTorch path), the deformable convolution (ours vs torchvision vs the
#      PyTorch path, bf16 and fp32), matching at 250x250, C = 256 (CFE-PatchMatch vs the fused bf16
#      matmul-argmax, the chunked bf16 matmul and exact enumerated matching).
# Logs land in $OUT (or out/gpu_check); a stage that fails or runs past its limit is reported and the
# next one still runs. Usage (on the GPU machine, repository root): bash bench/gpu_check.sh
set -u
OUT=${OUT:-out/gpu_check}
PY=${PY:-python3}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$OUT/triton-cache}  # JIT compiles shared by the stages
mkdir -p "$OUT"
failed=()

stage() {  # stage NAME LIMIT_S CMD...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout --signal=TERM --kill-after=5 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  printf '%-10s rc=%-3s %4ss  (log %s)\n' "$name" "$rc" "$((SECONDS - t0))" "$OUT/$name.log"
  tail -n 4 "$OUT/$name.log" | sed 's/^/    /'
  [ "$rc" -eq 0 ] || failed+=("$name")
}

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv >"$OUT/device.txt" 2>&1
cat "$OUT/device.txt"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

stage tests 150 "$PY" -m pytest -q -x -m gpu tests/kernels tests/deform tests/matching
stage memcheck 45 compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" -m bench.gpu_sanitize
stage racecheck 45 compute-sanitizer --tool racecheck --error-exitcode 1 "$PY" -m bench.gpu_sanitize
stage step 45 "$PY" -m bench.suite --sections step --budget-s 5 --time-budget-s 40
stage deform 90 bash -c "$PY -m bench.deform_conv --dtype bfloat16 --modes fwd,bwd && \
  $PY -m bench.deform_conv --dtype float32 --modes fwd,bwd --providers amsa-triton,torchvision"
stage matching 90 "$PY" -m bench.suite --sections matching --sizes 250 --channels 256 --refs 1 --batches 1 \
  --impls enumerated/fp32,cfe_patchmatch/triton,matmul_argmax_fused/bf16,matmul_argmax/bf16 --budget-s 20 \
  --time-budget-s 80

echo "failed stages: ${failed[*]:-none}"
[ ${#failed[@]} -eq 0 ]
