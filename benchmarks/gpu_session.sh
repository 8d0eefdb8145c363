#!/usr/bin/env bash
# One short GPU session: build, the GPU-marked tests, the step sweep and the GPU extras.
#
#   bash benchmarks/gpu_session.sh OUTDIR [STAGES]
#
# STAGES is a comma-separated subset of tests,step,extras (default: all three, in that
# order).  Run it from the repository root on a machine with a CUDA GPU and torch (with
# Triton) installed; it builds the extension in place (no pip, no network).  Each stage
# has its own time limit, so a slow one cannot take the others with it.  What it writes
# under OUTDIR: gpu.txt (card, driver, versions, build and test summary), step_cuda.md
# and step_cuda.json (bench_step.py), gpu_extras.md and gpu_compile.md (bench_gpu.py),
# log.txt.
set -uo pipefail
out=${1:-out}
stages=${2:-tests,step,extras}
mkdir -p "$out"
log="$out/log.txt"
has() { [[ ",$stages," == *",$1,"* ]]; }
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
py=${PYTHON:-python3}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $py -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee -a "$out/gpu.txt"

if has tests; then
  start=$SECONDS
  if ! ls esgdm/_C*.so >/dev/null 2>&1; then
    # the extension builds in the background while the Triton tests run
    ESGDM_BUILD_CUDA=1 $py setup.py -q build_ext --inplace > "$out/build.log" 2>&1 &
    build=$!
  else
    build=
  fi
  timeout 170 $py -m pytest -q -m gpu -p no:cacheprovider tests/test_triton_backend.py \
      tests/test_triton_signs.py tests/test_device_step.py -k "triton or torch or signs" 2>&1 | tail -15 | tee -a "$log" | tail -3 | sed 's/^/triton+torch GPU tests: /' | tee -a "$out/gpu.txt"
  if [ -n "$build" ]; then
    wait "$build" && echo "build: ok ($((SECONDS - start)) s since start)" | tee -a "$out/gpu.txt" \
      || { echo "build FAILED" | tee -a "$out/gpu.txt"; tail -40 "$out/build.log" | tee -a "$log"; }
  fi
  $py -m esgdm.info 2>&1 | tee -a "$log" | head -20
  timeout 150 $py -m pytest -q -m gpu -p no:cacheprovider tests/test_validation.py tests/test_cpp_backend.py tests/test_device_step.py tests/test_step_plan.py \
      -k "cpp_backend or cuda or plan" 2>&1 | tail -15 | tee -a "$log" | tail -3 | sed 's/^/cuda GPU tests: /' | tee -a "$out/gpu.txt"
  echo "tests stage: $((SECONDS - start)) s" | tee -a "$out/gpu.txt"
fi

if has step; then
  start=$SECONDS
  timeout 240 $py benchmarks/bench_step.py --device cuda --shapes few,transformer,many \
      --sizes 1M,16M,128M,1G --dtypes fp32,bf16 --only 'ESGD-M/(triton|cuda)|AdamW' \
      --hvp-max 128M --repeats 5 --compile off \
      --markdown "$out/step_cuda.md" --json "$out/step_cuda.json" >> "$log" 2>&1
  echo "step stage: rc $? in $((SECONDS - start)) s" | tee -a "$out/gpu.txt"
fi

if has extras; then
  start=$SECONDS
  # (each table is written as soon as it is measured: a limit keeps the tables before it)
  timeout 130 $py benchmarks/bench_gpu.py --device cuda --only host,tables,launches,train \
      --markdown "$out/gpu_extras.md" >> "$log" 2>&1
  echo "extras stage: rc $? in $((SECONDS - start)) s" | tee -a "$out/gpu.txt"
  timeout 90 $py benchmarks/bench_gpu.py --device cuda --only compile \
      --markdown "$out/gpu_compile.md" >> "$log" 2>&1
  echo "compile rows: rc $? in $((SECONDS - start)) s" | tee -a "$out/gpu.txt"
fi
