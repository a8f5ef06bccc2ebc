"""`lmforge finetune`: fine-tune a checkpoint on chat conversations (full or LoRA), loss on assistant tokens only."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from rich.table import Table

from lmforge.cli.common import (
    TYPE_NAMES,
    ProgressBar,
    duration,
    err,
    human,
    out,
    workspace_of,
)
from lmforge.cli.runs import energy_text, money
from lmforge.model.sizing import describe
from lmforge.train.finetune import FinetuneConfig, finetune, flag

HELP = "fine-tune a checkpoint on chat conversations (JSONL messages), full or LoRA"
DESCRIPTION = """\
Fine-tune a run or checkpoint on OpenAI-style chat data: a .jsonl file with one conversation per line,
{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}. Each conversation is rendered
with the checkpoint's chat template, the same one `lmforge serve` uses, and the loss counts only the
assistant replies (their tokens and end-of-turn marker). Conversations longer than the model's context are
truncated (and counted). A seeded --val-fraction of the conversations is held out; its assistant-token loss
is reported before and after. The result is a new run <workspace>/runs/NAME with one ordinary checkpoint
(LoRA adapters merged into the weights) carrying the base's tokenizer and chat template, and a ledger row
of kind "finetune" (tokens, FLOPs, time, energy, validation loss).

examples:
  lmforge finetune --ckpt my-run --data chat.jsonl --name my-chat
  lmforge finetune --ckpt smol --data chat.jsonl --lora 8 --epochs 2 --save-adapter --name smol-lora
  lmforge serve --ckpt my-chat
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per FinetuneConfig field, documented by the field's doc string."""
    for f in dataclasses.fields(FinetuneConfig):
        name = f"--{flag(f.name)}"
        help_text = f.metadata["doc"].replace("%", "%%")
        if f.type in ("bool", bool):
            p.add_argument(name, dest=f.name, action="store_true", help=help_text)
            continue
        typ = type(f.default)
        choices = f.metadata.get("choices")
        required = f.name in ("ckpt", "data")
        metavar = "{" + ",".join(choices) + "}" if choices else {"ckpt": "RUN|PATH", "data": "FILE.jsonl",
                                                                  "lora": "RANK"}.get(f.name, TYPE_NAMES[typ])
        p.add_argument(name, dest=f.name, type=typ, required=required, default=f.default, metavar=metavar,
                       help=help_text if required else f"{help_text} (default: {f.default!r})".replace("%", "%%"))


class ProgressReporter(ProgressBar):
    """Draws the fine-tuning progress bar and prints validation losses and the checkpoint."""

    def __init__(self) -> None:
        super().__init__("finetune")

    def started(self, info: dict[str, Any]) -> None:
        err.print(f"run [bold]{info['run']}[/] in {info['run_dir']}, from {info['base']}")
        err.print(f"model: {describe(info['shape'])}")
        err.print(f"method: {info['method']}, {human(info['trainable_params'])} of {human(info['params'])} "
                  f"parameters train; device {info['device']} ({info['dtype']}); energy: {info['energy_label']}")
        long = f", {info['truncated']} truncated to the context of {info['context']} tokens" if info["truncated"] \
            else ""
        dropped = f", {info['dropped']} dropped (no assistant token within the context)" if info["dropped"] else ""
        err.print(f"data: {info['train_conversations']} training / {info['val_conversations']} validation "
                  f"conversations{long}{dropped}; {info['steps']} steps")
        self.task = self.bar.add_task("finetune", total=info["steps"], status="starting")

    def stepped(self, s: dict[str, Any]) -> None:
        self.bar.update(self.task, completed=s["step"],
                        status=f"step {s['step']} | loss {s['loss']:.4f} | {human(s['tok_per_s'])} tok/s")

    def evaluated(self, s: dict[str, Any]) -> None:
        self.bar.console.print(f"step {s['step']:>6}: val loss (assistant tokens) {s['val_loss']:.4f}")

    def checkpointed(self, path: Path) -> None:
        self.bar.console.print(f"checkpoint {path}")


def print_summary(name: str, s: dict[str, Any]) -> None:
    table = Table(title=f"fine-tuning summary: {name}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    before, after = s.get("val_loss_before"), s.get("val_loss_after")
    val = f"{before:.4f} -> {after:.4f} (assistant tokens)" if before is not None else "- (--val-fraction 0)"
    method = f"LoRA rank {s['lora_rank']}, alpha {s['lora_alpha']:g} (merged)" if s["method"] == "lora" else "full"
    rows = [
        ("method", f"{method}: {human(s['trainable_params'])} of {human(s['params'])} parameters trained"),
        ("steps / epochs", f"{s['steps']:,} / {s['epochs']:.2f}"),
        ("tokens", f"{s['tokens']:,} ({s['target_tokens']:,} assistant tokens in the loss)"),
        ("FLOPs", human(s["flops"])),
        ("time", (f"{duration(s['wall_seconds'])} wall, {duration(s['train_seconds'])} in training steps, "
                  f"{human(s['tok_per_s'])} tokens/s")),
        ("validation loss", val),
        ("energy", f"{energy_text(s)}; {s['energy_label']}"),
        ("cost / CO2", f"{money(s['cost_usd'])}, {s['co2_kg'] * 1000:.3g} g"),
        ("checkpoint", s["checkpoint"]),
    ]
    if s.get("adapter"):
        rows.append(("adapter", s["adapter"]))
    for key, value in rows:
        table.add_row(key, value)
    out.print(table)


def run(args: argparse.Namespace) -> int:
    cfg = FinetuneConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(FinetuneConfig)})
    with ProgressReporter() as reporter:
        result = finetune(cfg, workspace_of(args), reporter=reporter)
    print_summary(result.run_name, result.summary)
    err.print(f"next: lmforge serve --ckpt {result.run_name}")
    return 0
