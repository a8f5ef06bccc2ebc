#!/usr/bin/env bash
# GPU check of serving, in one go on a fresh GPU machine (at most 10 minutes): the serving engine's GPU tests (the
# decode step as CUDA graphs against the eager step: bursts of compiled steps, speculative bursts), the decode
# step's own time (bench/decode_step.py: one step, bursts, speculative bursts at batch 1 and 32, and their
# kernels), then bench/serve_bench.py against Hugging Face `generate`, speculating at every batch size (on a GPU
# speculation is off by default until measured there: bench/RESULTS.md).
#
#   bash bench/gpu_serve.sh                                   # from the repository root
#   bash bench/gpu_serve.sh --speculate 0                     # arguments go to serve_bench
#   CKPT=lmforge-work/runs/my-run ROUNDS=5 SPECULATE_MAX_BATCH=1 bash bench/gpu_serve.sh   # serve_bench's setting
#   PARTS="tests decode_step" bash bench/gpu_serve.sh         # some of the three parts (two calls of the device
#   PARTS=serve_bench bash bench/gpu_serve.sh                 # tool under its 10-minute limit)
#
# Needs a CUDA build of torch with transformers and lmforge's other dependencies except the serving ones, which it
# installs from the wheels in .whl (no network: pip --no-index). lmforge runs from src/. The default checkpoint is
# the demo run's (stdlib corpus, depth 2), copied into the git-ignored lmforge-work/gpu-serve; .whl and that folder
# must travel with the working tree.
set -uo pipefail
cd "$(dirname "$0")/.."
CKPT=${CKPT:-lmforge-work/gpu-serve/runs/stdlib-d2-20261126-034509/checkpoints/step_00000164}
ROUNDS=${ROUNDS:-3}
SPECULATE_MAX_BATCH=${SPECULATE_MAX_BATCH:-32}
PARTS=${PARTS:-tests decode_step serve_bench}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 COLUMNS=160
failed=()

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch; print("torch", torch.__version__, "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")'
if ! python3 -c 'import fastapi, uvicorn, httpx, uvloop, httptools' 2>/dev/null; then
    python3 -m pip install -q --no-index --no-cache-dir --find-links .whl fastapi uvicorn httpx uvloop httptools \
        || exit 1
fi

part() { [[ " $PARTS " == *" $1 "* ]]; }

if part tests; then
    echo "== GPU tests: serving with CUDA graphs"
    timeout 170 python3 -m pytest -q -p no:cacheprovider -p no:logging tests/test_gpu.py -k graph \
        || failed+=("GPU tests")
fi

if part decode_step; then
    echo "== the decode step alone (bench/decode_step.py)"
    timeout 140 python3 bench/decode_step.py --ckpt "$CKPT" --device cuda --kernels || failed+=("decode_step")
fi

# 32 concurrent, 32-token prompts, 64 new tokens (serve_bench's defaults: compiled steps in graphs of bursts of 16,
# the prefill compiled, the engine in a process of its own), speculating while at most $SPECULATE_MAX_BATCH
# requests run. Extra arguments go to serve_bench (--engine adds the rows without HTTP, at the cost of a second
# start-up). It reports its progress on stderr, so a run cut short still says how far it got.
if part serve_bench; then
    echo "== serve_bench --speculate-max-batch $SPECULATE_MAX_BATCH $*"
    timeout 270 python3 bench/serve_bench.py --ckpt "$CKPT" --device cuda --rounds "$ROUNDS" \
        --speculate-max-batch "$SPECULATE_MAX_BATCH" "$@" || failed+=("serve_bench")
fi

if ((${#failed[@]})); then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "all passed"
