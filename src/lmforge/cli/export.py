"""`lmforge export hf`: a checkpoint as a Hugging Face transformers model folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmforge.checkpoint import resolve_checkpoint
from lmforge.cli.common import err, out, workspace_of
from lmforge.interop.hf import DTYPES, export_hf

HELP = "export a checkpoint for other tools: export hf RUN OUT_DIR"
DESCRIPTION = """\
Write a checkpoint as a folder that Hugging Face transformers loads offline with
AutoModelForCausalLM.from_pretrained(OUT_DIR) and AutoTokenizer.from_pretrained(OUT_DIR): a LlamaForCausalLM
(or Qwen3ForCausalLM for models with QK-norm) config, model.safetensors, the tokenizer and its chat template,
and a generation config. In fp32 its next-token logits equal lmforge's to ~1e-5. The folder is written to a
temporary name and renamed into place; an existing non-empty OUT_DIR is replaced only with --force.

examples:
  lmforge export hf my-run exported/my-run
  lmforge export hf lmforge-work/runs/my-run/checkpoints/step_00001000 exported/my-run --dtype bf16 --force
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("format", choices=("hf",), help="hf: Hugging Face transformers (Llama/Qwen3 architecture)")
    p.add_argument("ckpt", metavar="RUN_OR_CKPT", help="run name, run folder or checkpoint folder")
    p.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="folder to write")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="weight precision (default fp32)")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists and is not empty")


def run(args: argparse.Namespace) -> int:
    ckpt = resolve_checkpoint(args.ckpt, workspace_of(args).runs_dir)
    path = export_hf(ckpt, args.out_dir, dtype=args.dtype, force=args.force)
    out.print(str(path))
    err.print(f"exported {ckpt} ({args.dtype}); load it with "
              f"transformers.AutoModelForCausalLM.from_pretrained({str(path)!r})")
    return 0
