"""DiLoCo against DDP on this CPU: validation bpb, bytes on the wire, and wall time under each link preset.

    python bench/diloco_vs_ddp.py [--workspace DIR] [--steps 600] [--sync-every 10,50,100] [--wires fp32,bf16,int8]

Two sites of one process each train the same model on the same tokens (the stdlib corpus, a depth-2 model,
2 x 8 sequences of 128 tokens per step): once with DDP (a gradient all-reduce every step) and once per DiLoCo
setting (an outer exchange every H steps in the wire precision). Every run goes to the ledger in the workspace.

Wall time per link is computed, not run: the measured compute time of the run (its training time minus its time
in exchanges) plus the link model's time for every exchange the run made (dist/link.py: ring all-reduce for DDP
and fp32 DiLoCo, ring all-gather for bf16/int8). The runs themselves use the datacenter link, so nothing sleeps.
The target (issue 5): DiLoCo sends >= 100x fewer bytes than DDP at <= 2% worse validation bpb.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from lmforge.dist.link import PRESETS, all_reduce_bytes_sent
from lmforge.meter.ledger import Ledger

SITES = 2
DATA = ["--data.source", "stdlib", "--data.val_fraction", "0.01", "--tokenizer.vocab_size", "4096"]
MODEL = ["--model.depth", "2", "--model.seq_len", "128", "--train.batch_size", "8", "--train.threads", "1",
         "--train.eval_every", "0", "--train.eval_batches", "40", "--train.checkpoint_every", "0",
         "--train.lr", "0.01", "--train.matrix_lr", "0.01"]


def lmforge(workspace: Path, *args: str) -> None:
    env = {**os.environ, "LMFORGE_HOME": str(workspace)}
    p = subprocess.run([sys.executable, "-m", "lmforge", *args], env=env, capture_output=True, text=True, check=False)
    if p.returncode:
        sys.exit(f"lmforge {' '.join(args[:2])} failed:\n{p.stderr[-2000:]}")


def prepare(workspace: Path) -> None:
    if (workspace / "shards").is_dir():
        return
    print("preparing the stdlib corpus, tokenizer and shards ...", flush=True)
    lmforge(workspace, "corpus", "build", *DATA[:4])
    lmforge(workspace, "tokenizer", "train", *DATA)
    lmforge(workspace, "prepare", *DATA)


def train(workspace: Path, name: str, steps: int, *extra: str) -> dict:
    ledger = Ledger(workspace / "ledger.db")
    if not any(r["name"] == name and r["status"] == "completed" for r in ledger.list_runs()):
        print(f"training {name} ...", flush=True)
        lmforge(workspace, "train", *DATA, *MODEL, "--name", name, "--train.max_steps", str(steps), "--nproc",
                str(SITES), *extra)
    return ledger.get_run(name)["summary"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, default=Path(tempfile.gettempdir()) / "lmforge-diloco-bench")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--sync-every", default="10,50,100")
    parser.add_argument("--wires", default="fp32,bf16,int8")
    args = parser.parse_args()
    prepare(args.workspace)

    rows = []
    ddp = train(args.workspace, f"ddp-{args.steps}", args.steps)
    params, steps = ddp["params"], ddp["steps"]
    payload = 4 * params  # fp32 gradients
    rows.append(("DDP", "-", "fp32", ddp, steps, all_reduce_bytes_sent(payload, SITES) * steps, ddp["train_seconds"],
                 lambda link: steps * link.all_reduce_seconds(payload, SITES)))
    for h in [int(x) for x in args.sync_every.split(",")]:
        for wire in args.wires.split(","):
            s = train(args.workspace, f"diloco-h{h}-{wire}-{args.steps}", args.steps, "--sites", str(SITES),
                      "--sync-every", str(h), "--sites.wire", wire, "--link", "datacenter")
            exchanges = -(-steps // h)
            per_exchange = s["comm_bytes_per_site"] / exchanges / (SITES - 1)  # one site's all-gather payload

            def seconds(link, exchanges=exchanges, wire=wire, per_exchange=per_exchange):
                if wire == "fp32":
                    return exchanges * link.all_reduce_seconds(payload, SITES)
                return exchanges * link.all_gather_seconds(per_exchange, SITES)
            rows.append(("DiLoCo", str(h), wire, s, exchanges, s["comm_bytes_per_site"],
                         s["train_seconds"] - s["comm_seconds"], seconds))

    links = list(PRESETS.values())
    print(f"\n{SITES} sites, {params / 1e6:.2f}M params, {steps} steps x {ddp['tokens'] // steps:,} tokens; "
          f"wall time = measured compute + the link model's time for every exchange")
    header = f"{'method':<7} {'H':>4} {'wire':<5} {'val bpb':>8} {'vs DDP':>7} {'exchanges':>9} {'bytes/site':>11} " \
             f"{'fewer':>7}" + "".join(f" {link.name:>14}" for link in links)
    print(header)
    print("-" * len(header))
    base_bpb, base_bytes = ddp["val_bpb"], rows[0][5]
    for method, h, wire, s, exchanges, sent, compute, comm in rows:
        walls = "".join(f" {fmt_seconds(compute + comm(link)):>14}" for link in links)
        print(f"{method:<7} {h:>4} {wire:<5} {s['val_bpb']:>8.4f} {(s['val_bpb'] / base_bpb - 1) * 100:>+6.2f}% "
              f"{exchanges:>9} {fmt_bytes(sent):>11} {base_bytes / sent:>6.0f}x{walls}")


def fmt_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} PB"


def fmt_seconds(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


if __name__ == "__main__":
    main()
