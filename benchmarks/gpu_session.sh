#!/usr/bin/env bash
# One short GPU session: build, the GPU-marked tests, and the step benchmark.
# Usage (on a machine with a CUDA GPU and torch installed): bash benchmarks/gpu_session.sh OUTDIR
set -uo pipefail
out=${1:-out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
start=$(date +%s)
pip install -q --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1 || { tail -30 "$out/build.log"; }
echo "build: $(( $(date +%s) - start )) s" | tee -a "$out/gpu.txt"
python -m esgdm.info | tee "$out/info.txt"
timeout 200 python -m pytest -q -m gpu -p no:cacheprovider -x tests/test_device_step.py tests/test_cpp_backend.py \
    tests/test_triton_backend.py 2>&1 | tail -25 | tee "$out/gpu_tests.txt"
timeout 150 python benchmarks/bench_step.py --device cuda --shapes transformer,many --sizes 16M,128M \
    --dtypes fp32 --only 'ESGD-M/(triton|cuda)|AdamW|SGD' --hvp-max 0 --repeats 5 --compile off \
    --markdown "$out/step_cuda.md" 2>&1 | tail -40 | tee "$out/bench.txt"
