"""`lmforge eval`: validation loss and bits per byte of a checkpoint, recorded in the ledger."""

from __future__ import annotations

import argparse
import uuid
from pathlib import Path

import torch

from lmforge.checkpoint import load_model, resolve_checkpoint
from lmforge.cli.common import out, progress_bar, workspace_of
from lmforge.data.loader import count_eval_batches
from lmforge.data.shards import load_shards
from lmforge.meter.hardware import describe_machine
from lmforge.meter.ledger import Ledger
from lmforge.train.evaluate import evaluate
from lmforge.train.runtime import Runtime, resolve_device
from lmforge.workspace import Workspace

HELP = "measure a checkpoint's loss and bits per byte on a data split"
DESCRIPTION = """\
Evaluate a checkpoint on the validation (or training) split of the shards it was trained on, and record the
result in the ledger as an 'eval' run. Bits per byte is the tokenizer-independent figure to compare runs by.

examples:
  lmforge eval --ckpt my-run                    # the run's latest checkpoint, whole validation split
  lmforge eval --ckpt lmforge-work/runs/my-run/checkpoints/step_00000200 --batches 20
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, metavar="RUN|PATH", help="run name, run folder or checkpoint folder")
    p.add_argument("--split", choices=("val", "train"), default="val", help="which split (default val)")
    p.add_argument("--batches", type=int, default=0, metavar="N", help="at most N batches (default 0 = all)")
    p.add_argument("--batch-size", type=int, default=0, metavar="B", help="sequences per batch (default: as trained)")
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


def run(args: argparse.Namespace) -> int:
    workspace = workspace_of(args)
    path = resolve_checkpoint(args.ckpt, workspace.runs_dir)
    result = evaluate_checkpoint(workspace, path, args.split, args.batches, args.batch_size, args.device)
    out.print(f"{path}: {args.split} loss {result['loss']:.4f} | {args.split} bpb {result['bpb']:.4f} "
              f"| {result['tokens']:,} tokens")
    return 0
