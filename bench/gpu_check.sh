#!/usr/bin/env bash
# The GPU figures of bench/README.md in one call on a lent GPU machine: bench_apply (merged apply / change / restore /
# memory / on-the-fly forward, ours against diffusers+PEFT and the memory-bound limit) and bench_sidepath
# (on-the-fly overhead layer by layer), both on CUDA. Everything it prints is also written to $OUT.
#
# Prepare once, on the dev machine (the GPU image has torch, transformers and safetensors but no diffusers;
# peft is pinned to the version the CPU figures used; .whl/ is ignored by git and never committed):
#     echo /.whl/ >> .git/info/exclude
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#         diffusers==0.42.1 peft==0.21.2 importlib_metadata
# Then: the device tool's run with carry [".whl"] and command `bash bench/gpu_check.sh [tests|apply|sidepath|all]`.
# Sized for one 10-minute call ("all"); "tests", "apply" and "sidepath" split it if the machine is slow.
set -euo pipefail
part=${1:-all}
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
threads=$(nproc)
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
    python3 -c "import torch, diffusers, peft, transformers, safetensors; print('torch', torch.__version__,
'cuda', torch.version.cuda, '| diffusers', diffusers.__version__, '| peft', peft.__version__,
'| transformers', transformers.__version__, '| safetensors', safetensors.__version__,
'| tf32 matmul', torch.backends.cuda.matmul.allow_tf32)"
} 2>&1 | tee "$out/gpu.txt"
if [[ $part == all || $part == tests ]]; then  # the engine's CUDA tests first: numbers before timings
    python3 -m pytest -q -x tests/patch/test_cuda.py tests/patch/test_device_factors.py tests/patch/test_lowrank_side.py \
        2>&1 | tail -15 | tee "$out/tests.txt" || echo "CUDA TESTS FAILED (see above); the benchmarks still run" | tee -a "$out/tests.txt"
fi
if [[ $part == all || $part == apply ]]; then
    python3 bench/bench_apply.py --device cuda --models sd15,sdxl --stacks 1,3,5 --threads "$threads" \
        2>&1 | grep -v -e 'Loading weights' -e kernels-community | tee "$out/bench_apply.txt"
fi
if [[ $part == all || $part == sidepath ]]; then
    python3 bench/bench_sidepath.py --device cuda --stacks 1,3,5 --reps 20 --rounds 3 --threads "$threads" \
        2>&1 | grep -v -e 'Loading weights' -e kernels-community | tee "$out/bench_sidepath.txt"
fi
