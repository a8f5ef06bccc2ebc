"""`lmforge eval`: validation loss and bits per byte of a checkpoint, or lm-evaluation-harness tasks; recorded in
the ledger as an 'eval' run either way."""

from __future__ import annotations

import argparse
import json
import logging
import uuid
from pathlib import Path

import torch

from lmforge.checkpoint import load_model, resolve_checkpoint
from lmforge.cli.common import out, progress_bar, workspace_of
from lmforge.data.loader import count_eval_batches
from lmforge.data.shards import load_shards
from lmforge.errors import LmforgeError, UsageError
from lmforge.meter.hardware import describe_machine
from lmforge.meter.ledger import Ledger
from lmforge.train.evaluate import evaluate
from lmforge.train.runtime import Runtime, resolve_device
from lmforge.workspace import Workspace

HELP = "measure a checkpoint: loss and bits per byte, or lm-evaluation-harness tasks"
DESCRIPTION = """\
Without --tasks: evaluate a checkpoint on the validation (or training) split of the shards it was trained on.
Bits per byte is the tokenizer-independent figure to compare runs by.

With --tasks: run lm-evaluation-harness tasks (pip install 'lmforge[eval]') on the checkpoint in this process
and print lm-eval's results table. lmforge ships lmforge_python (multiple choice, by log-likelihood),
lmforge_python_gen (greedy completion, exact match) and lmforge_python_ppl (bits per byte), which need no
download; any task lm-eval knows works too, if its data set can be downloaded or is in the Hugging Face cache.
To evaluate a running `lmforge serve` with lm-eval's own client instead, see docs/evaluation.md.

Either way the result goes to the ledger as an 'eval' run: loss/bpb, or one metric per task named TASK/METRIC
(e.g. lmforge_python/acc) with all scores in the run's summary under "lm_eval".

examples:
  lmforge eval --ckpt my-run                    # the run's latest checkpoint, whole validation split
  lmforge eval --ckpt lmforge-work/runs/my-run/checkpoints/step_00000200 --batches 20
  lmforge eval --ckpt my-run --tasks lmforge_python,lmforge_python_ppl
  lmforge eval --ckpt my-run --tasks lmforge_python --limit 20 --json
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, metavar="RUN|PATH", help="run name, run folder or checkpoint folder")
    p.add_argument("--tasks", metavar="TASK[,TASK]", help="lm-eval tasks to run instead of loss/bpb "
                   "(shipped: lmforge_python, lmforge_python_gen, lmforge_python_ppl)")
    p.add_argument("--limit", type=int, metavar="N", help="with --tasks: at most N documents per task (default all)")
    p.add_argument("--split", choices=("val", "train"), help="without --tasks: which split (default val)")
    p.add_argument("--batches", type=int, default=0, metavar="N", help="without --tasks: at most N batches "
                   "(default 0 = all)")
    p.add_argument("--batch-size", type=int, default=0, metavar="B", help="sequences per batch (default: as trained; "
                   "with --tasks 16)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object instead of text")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")


def evaluate_checkpoint(workspace: Workspace, path: Path, split: str = "val", batches: int = 0,
                        batch_size: int = 0, device: str = "auto") -> dict:
    """Evaluate a checkpoint on a split of its shards, with a progress bar; recorded in the ledger as an eval run."""
    device = resolve_device(device)
    loaded = load_model(path, device)
    cfg = loaded.config
    shards = load_shards(workspace.shards_dir(cfg.tokenizer_name()), expected_tokenizer_hash=loaded.tokenizer.hash)
    tokens = shards.tokens(split)
    runtime = Runtime(device, "bf16" if device.type == "cuda" else "fp32", compile=False)
    batch_size = batch_size or cfg.train.batch_size
    total = count_eval_batches(tokens, batch_size, cfg.model.seq_len, batches or None)
    token_bytes = torch.from_numpy(loaded.tokenizer.token_byte_lengths())
    with progress_bar(f"eval {split}", total=total, unit="batches") as progress:
        result = evaluate(loaded.model, tokens, token_bytes, batch_size=batch_size, seq_len=cfg.model.seq_len,
                          max_batches=batches or None, runtime=runtime, progress=progress)
    ledger = Ledger(workspace.ledger_path)
    run_id = ledger.start_run(f"eval-{cfg.name}-step{loaded.step}-{split}-{uuid.uuid4().hex[:6]}", "eval",
                              cfg.to_dict(), {**describe_machine(), "device": str(device)}, str(path))
    metrics = {f"{split}_loss": result["loss"], f"{split}_bpb": result["bpb"]}
    ledger.log_metrics(run_id, loaded.step, metrics)
    ledger.finish_run(run_id, "completed", summary={**metrics, "tokens": result["tokens"], "checkpoint": str(path),
                                                    "step": loaded.step})
    return result


def evaluate_tasks_on_checkpoint(workspace: Workspace, path: Path, tasks: list[str], limit: int | None = None,
                                 batch_size: int = 0, device: str = "auto") -> dict:
    """Run lm-eval tasks on a checkpoint through the lmforge adapter; recorded in the ledger as an eval run.

    Returns {"run", "checkpoint", "step", "scores": {task: {metric: value}}, "samples": {task: documents},
    "table": lm-eval's results table}.
    """
    try:
        from lmforge.evals import LmforgeLM, evaluate_tasks, results_table, task_scores
    except ImportError as e:
        raise LmforgeError(f"--tasks needs lm-evaluation-harness, which is not installed ({e.name} is missing); "
                           f"pip install 'lmforge[eval]'") from None
    import lm_eval

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its INFO and advice lines would bury the table
    device = resolve_device(device, "--device")
    loaded = load_model(path, device)
    lm = LmforgeLM(loaded, batch_size=batch_size or "auto")
    results = evaluate_tasks(lm, tasks, limit=limit)
    scores = task_scores(results)
    samples = {task: n["effective"] for task, n in results.get("n-samples", {}).items()}
    cfg = loaded.config
    ledger = Ledger(workspace.ledger_path)
    name = f"lm-eval-{cfg.name}-step{loaded.step}-{uuid.uuid4().hex[:6]}"
    run_id = ledger.start_run(name, "eval", cfg.to_dict(), {**describe_machine(), "device": str(device)}, str(path))
    ledger.log_metrics(run_id, loaded.step, {f"{task}/{metric}": value for task, row in scores.items()
                                             for metric, value in row.items()})
    ledger.finish_run(run_id, "completed", summary={
        "lm_eval": scores, "tasks": tasks, "limit": limit, "samples": samples, "checkpoint": str(path),
        "step": loaded.step, "lm_eval_version": lm_eval.__version__})
    return {"run": name, "checkpoint": str(path), "step": loaded.step, "scores": scores, "samples": samples,
            "table": results_table(results)}


def run(args: argparse.Namespace) -> int:
    workspace = workspace_of(args)
    if args.tasks is None:
        if args.limit is not None:
            raise UsageError("--limit counts documents of --tasks; without --tasks use --batches N")
        path = resolve_checkpoint(args.ckpt, workspace.runs_dir)
        split = args.split or "val"
        result = evaluate_checkpoint(workspace, path, split, args.batches, args.batch_size, args.device)
        if args.json:
            print(json.dumps({"checkpoint": str(path), "split": split, **result}))
        else:
            out.print(f"{path}: {split} loss {result['loss']:.4f} | {split} bpb {result['bpb']:.4f} "
                      f"| {result['tokens']:,} tokens")
        return 0
    if args.split is not None or args.batches:
        raise UsageError("--split and --batches measure loss on the shards; with --tasks use --limit N")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise UsageError(f"--tasks {args.tasks!r} names no task; pass e.g. --tasks lmforge_python")
    path = resolve_checkpoint(args.ckpt, workspace.runs_dir)
    result = evaluate_tasks_on_checkpoint(workspace, path, tasks, args.limit, args.batch_size, args.device)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "table"}))
    else:
        out.print(result["table"], markup=False)
        out.print(f"{path}: recorded in the ledger as run {result['run']}", markup=False)
    return 0
