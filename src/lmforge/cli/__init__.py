"""The `lmforge` command: one module per verb, this table maps verb names to them.

Each verb module has HELP (one line), DESCRIPTION, add_arguments(parser) and run(args) -> exit code. User errors
(LmforgeError) print one line and exit 2; Ctrl-C exits 130; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys

from rich.markup import escape

from lmforge import __version__
from lmforge.cli.common import err
from lmforge.errors import LmforgeError, UsageError

VERBS = {
    "demo": "lmforge.cli.demo",
    "corpus": "lmforge.cli.corpus",
    "tokenizer": "lmforge.cli.tokenizer",
    "prepare": "lmforge.cli.prepare",
    "train": "lmforge.cli.train",
    "eval": "lmforge.cli.eval",
    "generate": "lmforge.cli.generate",
    "runs": "lmforge.cli.runs",
    "export": "lmforge.cli.export",
    "import": "lmforge.cli.import_hf",
    "finetune": "lmforge.cli.finetune",
    "serve": "lmforge.cli.serve",
    "guard": "lmforge.cli.guard",
    "plan-link": "lmforge.cli.plan_link",
    "plan": "lmforge.cli.plan",
    "fit": "lmforge.cli.fit",
    "report": "lmforge.cli.report",
    "dashboard": "lmforge.cli.dashboard",
    "sweep": "lmforge.cli.sweep",
    "launch": "lmforge.cli.launch",
}


class Parser(argparse.ArgumentParser):
    """argparse that raises (so main prints one line and exits 2) instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message}; see `{self.prog} --help`")


def build_parser() -> Parser:
    parser = Parser(prog="lmforge", allow_abbrev=False, description="Train small language models on scarce compute, and prove what "
                    "it cost. Every verb writes under one workspace folder (see --workspace).")
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    parser.add_argument("--workspace", metavar="DIR", help="Folder for corpora, tokenizers, shards, runs and the "
                        "ledger (default: $LMFORGE_HOME, else ./lmforge-work)")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=Parser)
    for name, module_name in VERBS.items():
        module = importlib.import_module(module_name)
        sub = verbs.add_parser(name, help=module.HELP, description=module.DESCRIPTION, allow_abbrev=False,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.add_argument("--workspace", metavar="DIR", default=argparse.SUPPRESS,
                         help="Workspace folder (default: $LMFORGE_HOME, else ./lmforge-work)")
        module.add_arguments(sub)
        sub.set_defaults(run=module.run, parser=sub)
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub = getattr(args, "parser", parser)
        unknown = next((a for a in extra if a.startswith("-")), extra[0])
        known = [s for action in sub._actions for s in action.option_strings]
        close = difflib.get_close_matches(unknown.split("=")[0], known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else f"; see `{sub.prog} --help`"
        raise UsageError(f"unknown option {unknown}{hint}" if unknown.startswith("-")
                         else f"unexpected argument {unknown!r}{hint}")
    if args.verb is None:
        parser.print_help()
        raise SystemExit(0)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse(argv)
        args.argv = argv  # a verb may start itself again (train --nproc launches torchrun)
        return args.run(args) or 0
    except LmforgeError as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)  # one line, even in a pipe
        return 2
    except KeyboardInterrupt as e:
        print(f"\ninterrupted: {e}" if str(e) else "\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lmforge generate ... | head`: the reader left, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
