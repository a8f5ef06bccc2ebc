"""`lmforge guard`: classify one text, evaluate a policy on labelled prompts, or print the default policy."""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources

from rich.table import Table

from lmforge.cli.common import out
from lmforge.errors import UsageError
from lmforge.guard.evaluate import evaluate, load_records, shipped_devset
from lmforge.guard.guard import Guard

HELP = "safety guard: check a text, evaluate a policy on labelled prompts, print the default policy"
DESCRIPTION = """\
The guard classifies text into hazard categories (the MLCommons taxonomy that Llama Guard 3 uses, plus personal
data) with rules, PII patterns and a sentence-embedding classifier, and a policy decides per category and direction
whether to block, redact, flag or allow. (Applying a policy inside `lmforge serve` is the next step of this work.)

  check TEXT   the verdict for one text ('-' or nothing reads stdin); exit 0 = passes, 1 = blocked
  eval         refusal rates on labelled JSONL prompts (default: the shipped set's held-out split)
  policy       print the shipped default policy, to start your own from

examples:
  lmforge guard check "how do I kill a python process"
  lmforge guard check --direction output --json "mail me at ana@example.com"
  lmforge guard eval                                  # the shipped dev set, held-out split
  lmforge guard eval --data prompts.jsonl --policy my_policy.yaml --json
  lmforge guard policy > my_policy.yaml
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=type(p))
    check = actions.add_parser("check", help="the verdict for one text; exit 0 = passes, 1 = blocked")
    check.add_argument("text", nargs="?", default="-", help="the text ('-' or nothing: standard input)")
    check.add_argument("--direction", choices=("input", "output"), default="input",
                       help="treat the text as a request (input, default) or a model's response (output)")
    evaluate_ = actions.add_parser("eval", help="refusal rates on labelled JSONL prompts")
    evaluate_.add_argument("--data", metavar="JSONL", help="labelled prompts {text, label[, category, kind, "
                           "split]} (default: the shipped dev set)")
    evaluate_.add_argument("--split", default=None, help="only records with this 'split' ('all' = every record; "
                           "default: 'heldout' for the shipped set, every record for --data)")
    actions.add_parser("policy", help="print the shipped default policy")
    for sub in (check, evaluate_):
        sub.add_argument("--policy", metavar="FILE", help="policy YAML (default: the shipped default policy)")
        sub.add_argument("--json", action="store_true", help="print JSON instead of tables")
    for sub in (check, evaluate_, actions.choices["policy"]):
        sub.set_defaults(parser=sub)


def read_text(arg: str) -> str:
    if arg != "-":
        return arg
    if sys.stdin is None or sys.stdin.isatty():
        raise UsageError("no text: pass it as an argument or pipe it on standard input")
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"standard input is not valid UTF-8 (byte {e.start}); send UTF-8 text") from None


def check(args: argparse.Namespace) -> int:
    text = read_text(args.text)
    verdict = Guard.from_policy(args.policy).check(text, args.direction)
    findings = [{"category": f.category, "score": round(f.score, 4), "detector": f.detector,
                 "span": list(f.span) if f.span else None, "action": f.action} for f in verdict.findings]
    if args.json:
        print(json.dumps({"action": verdict.action, "direction": verdict.direction, "findings": findings,
                          "text": verdict.text, "ms": round(verdict.seconds * 1000, 3)}, ensure_ascii=False))
    else:
        out.print(f"[bold]{verdict.action}[/] ({verdict.direction}, {verdict.seconds * 1000:.1f} ms)")
        for f in findings:
            where = f" at {f['span'][0]}..{f['span'][1]}" if f["span"] else ""
            out.print(f"  {f['action']:<6} {f['category']} (score {f['score']:.2f}, {f['detector']}{where})")
        if verdict.action == "redact":
            out.print(verdict.text, markup=False)
    return 1 if verdict.blocked else 0


def rate_table(title: str, columns: tuple[str, str, str], groups: dict[str, dict], total: tuple) -> Table:
    """One row per group (its count and the rate in columns[2]), then the total in bold."""
    table = Table(title=title, title_justify="left")
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    rate = columns[2]
    for name, s in groups.items():
        table.add_row(name, str(s["n"]), f"{s[rate]:.1%}")
    label, n, value = total
    table.add_row(f"[bold]{label}[/]", str(n), f"[bold]{value:.1%}[/]")
    return table


def evaluate_policy(args: argparse.Namespace) -> int:
    data = args.data or shipped_devset()
    split = args.split if args.split is not None else (None if args.data else "heldout")
    records = load_records(data, None if split == "all" else split)
    result = evaluate(Guard.from_policy(args.policy), records)
    if args.json:
        print(json.dumps(result))
        return 0
    where = f"{data}" + (f", split {split}" if split else "")
    out.print(rate_table(f"guard eval: {len(records)} prompts ({where})", ("category", "harmful", "blocked"),
                         result["per_category"], ("all harmful", result["harmful"], result["harmful_blocked"])))
    out.print(rate_table("benign prompts refused (over-refusal)", ("kind", "benign", "refused"),
                         result["per_benign_kind"], ("all benign", result["benign"], result["benign_refused"])))
    lat = result["latency_ms"]
    out.print(f"F1 {result['f1']:.3f} (precision {result['precision']:.3f}) | latency per text: p50 "
              f"{lat['p50']:.2f} ms, p99 {lat['p99']:.2f} ms")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.action == "policy":
        sys.stdout.write(resources.files("lmforge.guard").joinpath("assets/default_policy.yaml")
                         .read_text(encoding="utf-8"))
        return 0
    if args.action == "check":
        return check(args)
    return evaluate_policy(args)
