"""`lmforge generate`: sample text from a checkpoint, streamed to stdout."""

from __future__ import annotations

import argparse
import sys

from lmforge.checkpoint import load_model, resolve_checkpoint
from lmforge.cli.common import workspace_of
from lmforge.errors import UsageError
from lmforge.model.sampling import generate
from lmforge.train.runtime import resolve_device

HELP = "sample text from a checkpoint (prompt as argument or on stdin)"
DESCRIPTION = """\
Continue a prompt with a trained model, streaming tokens to stdout as they are sampled (KV cache).
The prompt is the argument, or standard input when the argument is '-' or missing.

examples:
  lmforge generate --ckpt my-run "def fibonacci(n):"
  echo "import os" | lmforge generate --ckpt my-run --temperature 0 --max-new-tokens 50
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", default="-", help="the prompt; '-' or nothing reads standard input")
    p.add_argument("--ckpt", required=True, metavar="RUN|PATH", help="run name, run folder or checkpoint folder")
    p.add_argument("--max-new-tokens", type=int, default=200, metavar="N", help="tokens to generate (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=50, metavar="K", help="sample from the K likeliest (0 = off; default 50)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (1 = off; default 1)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")


def read_prompt(arg: str) -> str:
    if arg != "-":
        return arg
    if sys.stdin is None or sys.stdin.isatty():
        raise UsageError("no prompt: pass it as an argument or pipe it on standard input")
    return sys.stdin.read()


def run(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise UsageError(f"--top-k must be >= 0, got {args.top_k}")
    prompt = read_prompt(args.prompt)
    loaded = load_model(resolve_checkpoint(args.ckpt, workspace_of(args).runs_dir), resolve_device(args.device, "--device"))
    prompt_ids = [loaded.tokenizer.eot_id] + loaded.tokenizer.encode(prompt)  # documents start after a boundary
    context = loaded.model.shape.max_seq_len
    if len(prompt_ids) >= context:
        raise UsageError(f"the prompt has {len(prompt_ids) - 1} tokens but the model's context is {context} "
                         f"(room is needed for at least one new token); shorten the prompt")
    stream = loaded.tokenizer.decode_stream()
    sys.stdout.write(prompt)
    for token in generate(loaded.model, prompt_ids, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_k=args.top_k or None,
                          top_p=args.top_p if args.top_p < 1 else None, seed=args.seed,
                          stop_ids=(loaded.tokenizer.eot_id,)):
        sys.stdout.write(stream.push(token))
        sys.stdout.flush()
    sys.stdout.write(stream.flush() + "\n")
    return 0
