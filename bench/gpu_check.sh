#!/usr/bin/env bash
# GPU check of the trainer: the GPT-2-small shape (12 layers x 768 wide, 12 heads, seq 1024) with bf16 autocast and
# torch.compile for a fixed wall-clock budget. Prints steady-state tokens/s and MFU, and validation bits per byte
# over time, through the same CLI verbs a user runs.
#
#   bash bench/gpu_check.sh                         # 180 s of training, batch 64 x 1024
#   BUDGET=600 BATCH=32 bash bench/gpu_check.sh     # longer, smaller batch (also DEPTH, SEQ, VOCAB, PACKAGES)
#
# Needs a CUDA GPU and a CUDA build of torch with lmforge's other dependencies (lmforge itself runs from src/).
# Data (no download): the Python sources of large packages installed next to torch, ~200 MB of text.
set -euo pipefail
BUDGET=${BUDGET:-180}
BATCH=${BATCH:-64}
DEPTH=${DEPTH:-12}
SEQ=${SEQ:-1024}
VOCAB=${VOCAB:-32768}
PACKAGES=${PACKAGES:-torch transformers sympy scipy sklearn pandas jax}
WORK=${WORK:-/tmp/lmforge-gpu-check}
RUN=gpt2-small-check
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" LMFORGE_HOME="$WORK/workspace" PYTHONUNBUFFERED=1 COLUMNS=160
lmforge() { python3 -m lmforge "$@"; }
rm -rf "$WORK" && mkdir -p "$WORK/pycode"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch; print("torch", torch.__version__, "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")'

echo "== GPU tests"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py

echo "== data"
site=$(python3 -c 'import torch, pathlib; print(pathlib.Path(torch.__file__).parents[1])')
packages=$(cd "$site" && ls -d $PACKAGES 2>/dev/null || true)
(cd "$site" && find $packages -name '*.py' -print0 | xargs -0 cp --parents -t "$WORK/pycode")
corpus=(--data.source "$WORK/pycode" --data.glob '**/*.py' --data.name pycode)
data=("${corpus[@]}" --tokenizer.vocab_size "$VOCAB")
time lmforge corpus build "${corpus[@]}" | tail -12
time lmforge tokenizer train "${data[@]}" | tail -2
time lmforge prepare "${data[@]}" | tail -6

echo "== train: ${BUDGET}s, batch ${BATCH} x ${SEQ}"
lmforge train "${data[@]}" --name "$RUN" --model.depth "$DEPTH" --model.seq_len "$SEQ" --model.kv_group 1 \
    --train.batch_size "$BATCH" --train.max_time "$BUDGET" --train.eval_every 100 --train.eval_batches 20 \
    --train.checkpoint_every 0 2>&1 | grep -v '^\s*$' | tail -45
lmforge runs show "$RUN" | sed '/^config:/,$d'

echo "== steady state (steps whose interval holds no validation and no compile)"
python3 - "$RUN" <<'EOF'
import os, sys
from lmforge.meter.ledger import Ledger
from lmforge.workspace import Workspace
ledger = Ledger(Workspace.resolve(None).ledger_path)
run = ledger.get_run(sys.argv[1])
s, cfg = run["summary"], run["config"]["train"]
per_step = {}
for step, name, value in ledger.get_metrics(run["id"]):
    per_step.setdefault(step, {})[name] = value
evals = {step for step, m in per_step.items() if "val_bpb" in m}
tokens = seconds = 0.0
for step in sorted(per_step)[10:]:  # the first steps compile and warm up
    prev = per_step.get(step - 1)
    if prev is None or (step - 1) in evals or "time" not in per_step[step]:
        continue
    tokens += per_step[step]["tokens"] - prev["tokens"]
    seconds += per_step[step]["time"] - prev["time"]
tok_s = tokens / seconds
flops_per_token = s["flops"] / s["tokens"]
print(f"steady state: {tok_s:,.0f} tokens/s over {tokens / 1e6:.1f}M tokens, "
      f"{tok_s * flops_per_token / 1e12:.1f} TFLOP/s = MFU {tok_s * flops_per_token / s['peak_flops']:.1%} "
      f"of {s['peak_flops'] / 1e12:.0f} TFLOP/s ({s['profile']})")
print(f"whole run incl. compile: {s['tok_per_s']:,.0f} tokens/s, MFU {s['mfu']:.1%}; final val bpb {s['val_bpb']:.4f}; "
      f"energy {s['energy_j'] / 3.6e3:.1f} Wh ({s['energy_label']})")
EOF
