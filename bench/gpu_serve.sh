#!/usr/bin/env bash
# GPU check of serving, in one go on a fresh GPU machine (about 3 minutes, at most 6): the serving engine's GPU
# tests (the decode step as CUDA graphs against the eager step), then bench/serve_bench.py against Hugging Face
# `generate` with CUDA graphs on and, on the same machine, off (the previous setting: eager steps, no compile).
#
#   bash bench/gpu_serve.sh                                   # from the repository root
#   CKPT=lmforge-work/runs/my-run ROUNDS=5 bash bench/gpu_serve.sh
#
# Needs a CUDA build of torch with transformers and lmforge's other dependencies except the serving ones, which it
# installs from the wheels in .whl (no network: pip --no-index). lmforge runs from src/. The default checkpoint is
# the demo run's (stdlib corpus, depth 2), copied into the git-ignored lmforge-work/gpu-serve; .whl and that folder
# must travel with the working tree.
set -uo pipefail
cd "$(dirname "$0")/.."
CKPT=${CKPT:-lmforge-work/gpu-serve/runs/stdlib-d2-20261126-034509/checkpoints/step_00000164}
ROUNDS=${ROUNDS:-3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 COLUMNS=160
failed=()

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch; print("torch", torch.__version__, "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")'
if ! python3 -c 'import fastapi, uvicorn, httpx' 2>/dev/null; then
    python3 -m pip install -q --no-index --no-cache-dir --find-links .whl fastapi uvicorn httpx || exit 1
fi

echo "== GPU tests: serving with CUDA graphs"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k graph || failed+=("GPU tests")

# 32 concurrent, 32-token prompts, 64 new tokens (serve_bench's defaults); --engine adds the rows without HTTP
for graphs in on off; do
    echo "== serve_bench: CUDA graphs $graphs"
    timeout 110 python3 bench/serve_bench.py --ckpt "$CKPT" --device cuda --rounds "$ROUNDS" --engine \
        --cuda-graphs "$graphs" || failed+=("serve_bench --cuda-graphs $graphs")
done

if ((${#failed[@]})); then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "all passed"
