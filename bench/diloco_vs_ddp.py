"""DiLoCo against DDP on this CPU: validation bpb, bytes on the wire, and wall time under each link preset.

    python bench/diloco_vs_ddp.py [--workspace DIR] [--steps 600] [--sync-every 10,50,100] [--wires fp32,bf16,int8]
        [--batch-size 8] [--lr 0.01] [--outer-lr 0.7] [--outer-momentum 0.9] [--sync-by steps]
        [--seeds 1337]

Two sites of one process each train the same model on the same tokens (the stdlib corpus, a depth-2 model,
2 x --batch-size sequences of 128 tokens per step): once with DDP (a gradient all-reduce every step) and once per
DiLoCo setting (an outer exchange every H steps in the wire precision). --lr is both the AdamW and the Muon learning
rate, the same for DDP and every site; --outer-lr and --outer-momentum set DiLoCo's outer Nesterov SGD (1.0 and 0
= plain averaging); --sync-by lr spaces DiLoCo's exchanges by the learning rate (H steps apart at its peak,
farther apart in warm-up and decay: --sites.sync_by). Validation always reads the same 320 sequences. Every run
goes to the ledger in the workspace, named by the settings that differ from the defaults.

Wall time per link is computed, not run: the measured compute time of the run (its training time minus its time
in exchanges) plus the link model's time for every exchange the run made (dist/link.py: ring all-reduce for DDP
and fp32 DiLoCo, ring all-gather for bf16/int8/nf4). The runs themselves use the datacenter link, so nothing sleeps.
The target (issue 5): DiLoCo sends >= 100x fewer bytes than DDP at <= 2% worse validation bpb.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from lmforge.config import SYNC_BY
from lmforge.dist.link import PRESETS, all_reduce_bytes_sent
from lmforge.meter.ledger import Ledger

SITES = 2
DATA = ["--data.source", "stdlib", "--data.val_fraction", "0.01", "--tokenizer.vocab_size", "4096"]
MODEL = ["--model.depth", "2", "--model.seq_len", "128", "--train.threads", "1",
         "--train.eval_every", "0", "--train.checkpoint_every", "0"]
VAL_SEQUENCES = 320  # validation batches = this / --batch-size, so every batch size is scored on the same text


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


def train(workspace: Path, name: str, steps: int, batch_size: int, *extra: str) -> dict:
    ledger = Ledger(workspace / "ledger.db")
    if not any(r["name"] == name and r["status"] == "completed" for r in ledger.list_runs()):
        print(f"training {name} ...", flush=True)
        lmforge(workspace, "train", *DATA, *MODEL, "--name", name, "--train.max_steps", str(steps), "--nproc",
                str(SITES), "--train.batch_size", str(batch_size), "--train.eval_batches",
                str(VAL_SEQUENCES // batch_size), *extra)
    return ledger.get_run(name)["summary"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, default=Path(tempfile.gettempdir()) / "lmforge-diloco-bench")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--sync-every", default="10,50,100")
    parser.add_argument("--wires", default="fp32,bf16,int8")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per site per step")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--outer-lr", type=float, default=0.7)
    parser.add_argument("--outer-momentum", type=float, default=0.9)
    parser.add_argument("--sync-by", choices=SYNC_BY, default="steps",
                        help="DiLoCo's exchanges every H steps, or every H steps' worth of learning rate")
    parser.add_argument("--seeds", default="1337", help="comma-separated; with several, every run is repeated per "
                        "seed and the bpb gaps are averaged")
    args = parser.parse_args()
    if VAL_SEQUENCES % args.batch_size:
        sys.exit(f"--batch-size {args.batch_size} does not divide the {VAL_SEQUENCES} validation sequences; "
                 f"pass a divisor of {VAL_SEQUENCES} (8, 16, 32, ...)")
    prepare(args.workspace)
    seeds = [int(x) for x in args.seeds.split(",")]
    gaps: dict[tuple[str, str], list[float]] = {}  # (H, wire) -> each seed's bpb gap to DDP, in %
    fewer: dict[tuple[str, str], float] = {}  # (H, wire) -> times fewer bytes than DDP
    for seed in seeds:
        for method, h, wire, s, *_ in compare(args, seed):
            if method == "DiLoCo":
                gaps.setdefault((h, wire), []).append(s["val_bpb_gap"])
                fewer[h, wire] = s["fewer_bytes"]
    print(f"\nThe target: >= 100x fewer bytes than DDP at <= 2% worse validation bpb (DiLoCo against DDP with the "
          f"same seed; {'the mean over seeds' if len(seeds) > 1 else 'seed'} {', '.join(map(str, seeds))}):")
    for (h, wire), values in gaps.items():
        gap, met = statistics.mean(values), fewer[h, wire] >= 100 and statistics.mean(values) <= 2
        spread = f" +- {statistics.stdev(values) / len(values) ** 0.5:.2f} (standard error)" if len(values) > 1 else ""
        print(f"H {h:>4} {wire:<5} {fewer[h, wire]:>5.0f}x fewer bytes, bpb {gap:+.2f}%{spread}"
              + (f" (per seed {'  '.join(f'{v:+.2f}%' for v in values)})" if len(values) > 1 else "")
              + f": {'MET' if met else 'not met'}")


def compare(args: argparse.Namespace, seed: int) -> list[tuple]:
    """DDP and every DiLoCo setting with one seed (trained unless the workspace's ledger has them): prints their
    table and returns its rows."""
    # run names carry the settings that differ from the defaults, so one workspace holds several grids
    common = ["--train.lr", str(args.lr), "--train.matrix_lr", str(args.lr), "--train.seed", str(seed)]
    tag = "".join(f"-{key}{value:g}" for key, value, default in [("b", args.batch_size, 8), ("lr", args.lr, 0.01),
                                                                   ("s", seed, 1337)] if value != default)
    outer = ("" if (args.outer_lr, args.outer_momentum) == (0.7, 0.9) else
             f"-o{args.outer_lr:g}m{args.outer_momentum:g}") + ("-bylr" if args.sync_by == "lr" else "")
    rows = []
    ddp = train(args.workspace, f"ddp-{args.steps}{tag}", args.steps, args.batch_size, *common)
    params, steps = ddp["params"], ddp["steps"]
    payload = 4 * params  # fp32 gradients
    rows.append(("DDP", "-", "fp32", ddp, steps, all_reduce_bytes_sent(payload, SITES) * steps, ddp["train_seconds"],
                 lambda link: steps * link.all_reduce_seconds(payload, SITES)))
    for h in [int(x) for x in args.sync_every.split(",")]:
        for wire in args.wires.split(","):
            s = train(args.workspace, f"diloco-h{h}-{wire}-{args.steps}{tag}{outer}", args.steps, args.batch_size,
                      *common, "--sites", str(SITES), "--sync-every", str(h), "--sites.wire", wire, "--link",
                      "datacenter", "--sites.outer_lr", str(args.outer_lr), "--sites.outer_momentum",
                      str(args.outer_momentum), "--sites.sync_by", args.sync_by)
            exchanges = s.get("outer_steps", -(-steps // h))  # (runs recorded before outer_steps: every H steps)
            per_exchange = s["comm_bytes_per_site"] / exchanges / (SITES - 1)  # one site's all-gather payload

            def seconds(link, exchanges=exchanges, wire=wire, per_exchange=per_exchange):
                if wire == "fp32":
                    return exchanges * link.all_reduce_seconds(payload, SITES)
                return exchanges * link.all_gather_seconds(per_exchange, SITES)
            rows.append(("DiLoCo", str(h), wire, s, exchanges, s["comm_bytes_per_site"],
                         s["train_seconds"] - s["comm_seconds"], seconds))

    links = list(PRESETS.values())
    print(f"\n{SITES} sites, {params / 1e6:.2f}M params, {steps} steps x {ddp['tokens'] // steps:,} tokens, seed {seed}; "
          f"wall time = measured compute + the link model's time for every exchange")
    header = f"{'method':<7} {'H':>4} {'wire':<5} {'val bpb':>8} {'vs DDP':>7} {'exchanges':>9} {'bytes/site':>11} " \
             f"{'fewer':>7}" + "".join(f" {link.name:>14}" for link in links)
    print(header)
    print("-" * len(header))
    base_bpb, base_bytes = ddp["val_bpb"], rows[0][5]
    for method, h, wire, s, exchanges, sent, compute, comm in rows:
        s["val_bpb_gap"], s["fewer_bytes"] = (s["val_bpb"] / base_bpb - 1) * 100, base_bytes / sent
        walls = "".join(f" {fmt_seconds(compute + comm(link)):>14}" for link in links)
        print(f"{method:<7} {h:>4} {wire:<5} {s['val_bpb']:>8.4f} {s['val_bpb_gap']:>+6.2f}% "
              f"{exchanges:>9} {fmt_bytes(sent):>11} {s['fewer_bytes']:>6.0f}x{walls}")
    return rows


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
