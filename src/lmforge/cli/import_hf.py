"""`lmforge import hf`: a local Hugging Face Llama/Qwen3 model folder as an lmforge run."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lmforge.checkpoint import read_config, read_meta
from lmforge.cli.common import err, out, workspace_of
from lmforge.errors import UsageError
from lmforge.interop.hf import import_hf
from lmforge.meter.ledger import Ledger
from lmforge.model.sizing import describe
from lmforge.model.transformer import TransformerShape

HELP = "import a model from other tools: import hf HF_DIR [--name NAME]"
DESCRIPTION = """\
Import a local Hugging Face transformers folder (config.json, model.safetensors, tokenizer.json) holding a
LlamaForCausalLM or Qwen3ForCausalLM as the run <workspace>/runs/NAME with one checkpoint (fp32 weights, the
tokenizer, the model's chat template), so that generate, serve and fine-tuning can use it. Features our model
cannot compute exactly (attention or MLP biases, rope scaling, sliding windows, an activation other than silu,
another model_type) are refused with an error naming them. The tokenizer must be byte-level BPE with an
<|endoftext|> token (Qwen, SmolLM and lmforge's own are; Llama 3's is not). Nothing is downloaded.

examples:
  lmforge import hf ~/models/SmolLM2-135M --name smol
  lmforge import hf ~/models/Qwen3-0.6B --name qwen3 --max-seq-len 4096
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("format", choices=("hf",), help="hf: Hugging Face transformers (Llama/Qwen3 architecture)")
    p.add_argument("hf_dir", metavar="HF_DIR", type=Path, help="a folder written by save_pretrained")
    p.add_argument("--name", help="run name (default: the folder's name)")
    p.add_argument("--max-seq-len", type=int, metavar="N", help="context to use, at most the model's "
                   "max_position_embeddings (default: all of it); a shorter one makes serving's KV cache smaller")


def run(args: argparse.Namespace) -> int:
    name = args.name or args.hf_dir.absolute().name
    if not name or "/" in name or name.startswith("."):
        raise UsageError(f"run name {name!r} is not a plain folder name; pass --name NAME")
    workspace = workspace_of(args)
    ledger = Ledger(workspace.ledger_path)
    if any(r["name"] == name for r in ledger.list_runs()):
        raise UsageError(f"a run named {name!r} is already in the ledger {ledger.path}; choose another --name")
    started = time.time()
    ckpt = import_hf(args.hf_dir, workspace.run_dir(name), max_seq_len=args.max_seq_len)
    meta = read_meta(ckpt)
    run_id = ledger.start_run(name, "import", read_config(ckpt).to_dict(), {}, str(workspace.run_dir(name)))
    ledger.add_artifact(run_id, "checkpoint", str(ckpt))
    ledger.finish_run(run_id, "completed", summary={"params": meta["params"], "checkpoint": str(ckpt),
                                                     "imported_from": meta["imported_from"]["path"],
                                                     "wall_seconds": time.time() - started})
    out.print(str(ckpt))
    err.print(f"imported {args.hf_dir} as run {name}: {describe(TransformerShape(**meta['shape']))}")
    err.print(f"next: lmforge generate --ckpt {name} \"Hello\"   or   lmforge serve --ckpt {name}")
    return 0
