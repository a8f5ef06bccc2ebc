"""What every verb shares: config flags generated from the typed config, the workspace, progress bars."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml
from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn, TransferSpeedColumn)

from lmforge.config import SECTIONS, RunConfig, config_from_dict, field_type, iter_fields, load_config
from lmforge.errors import ConfigError, LmforgeError
from lmforge.units import human  # noqa: F401  (the verbs import it from here)
from lmforge.workspace import Workspace

# Results go to stdout (pipe-able); progress, status and errors to stderr.
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

TYPE_NAMES = {int: "INT", float: "NUM", str: "TEXT", bool: "BOOL"}


def add_config_arguments(parser: argparse.ArgumentParser, sections: tuple[str, ...]) -> None:
    """`--config FILE` plus one `--section.field` flag per config field, documented by the field's doc string."""
    parser.add_argument("--config", metavar="FILE", help="YAML config file (sections: " + ", ".join(sections) + ")")
    groups = {s: parser.add_argument_group(f"{s} settings (YAML section '{s}:')") for s in sections}
    for section, f in iter_fields():
        if section not in sections and not (section == "" and "run" in sections):
            continue
        typ = field_type(SECTIONS[section] if section else RunConfig, f.name)
        choices = f.metadata.get("choices")
        metavar = "{" + ",".join(choices) + "}" if choices else TYPE_NAMES[typ]
        default = f.default if f.default is not dataclasses.MISSING else None
        target = groups.get(section, parser)
        target.add_argument(f"--{section}.{f.name}" if section else f"--{f.name}", dest=f"cfg:{section}.{f.name}"
                            if section else f"cfg:{f.name}", metavar=metavar, default=argparse.SUPPRESS,
                            help=f"{f.metadata['doc']} (default: {default!r})".replace("%", "%%"))


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {k[len("cfg:"):]: v for k, v in vars(args).items() if k.startswith("cfg:")}


def config_from_args(args: argparse.Namespace, base: RunConfig | None = None) -> RunConfig:
    """The run config: defaults (or `base`, e.g. a saved run's config) < --config YAML < --section.field flags."""
    overrides = config_overrides(args)
    if base is None:
        return load_config(getattr(args, "config", None), overrides)
    if getattr(args, "config", None):
        raise ConfigError("--config cannot be combined with --resume; the run's saved config is used "
                          "(override single settings with --section.field flags)")
    merged = base.to_dict()
    for key, value in overrides.items():
        section, _, name = key.rpartition(".")
        (merged[section] if section else merged)[name] = value
    return config_from_dict(merged)


def packaged_config(name: str) -> dict[str, Any]:
    return yaml.safe_load(resources.files("lmforge").joinpath("configs", name).read_text())


def workspace_of(args: argparse.Namespace) -> Workspace:
    return Workspace.resolve(getattr(args, "workspace", None))


def existing_ledger(args: argparse.Namespace) -> Path:
    """The workspace's ledger, which must exist already (for the verbs that only read it)."""
    path = workspace_of(args).ledger_path
    if not path.is_file():
        raise LmforgeError(f"no ledger at {path}; `lmforge train` or `lmforge demo` records runs there "
                           f"(or pass the --workspace that holds them)")
    return path


def progress_columns(unit: str = "") -> list:
    counts = [DownloadColumn(), TransferSpeedColumn()] if unit == "bytes" else [MofNCompleteColumn(), TextColumn(unit)]
    return [SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), *counts, TimeElapsedColumn(),
            TextColumn("eta"), TimeRemainingColumn()]


@contextlib.contextmanager
def progress_bar(description: str, total: int | None = None, unit: str = "") -> Iterator[Callable[[int, int | None], None]]:
    """A rich progress bar on stderr, as the `progress(advance, total)` callback the library functions take."""
    with Progress(*progress_columns(unit), console=err, transient=False) as bar:
        task = bar.add_task(description, total=total)

        def advance(n: int, new_total: int | None = None) -> None:
            if new_total is not None:
                bar.update(task, total=new_total)
            bar.advance(task, n)

        try:
            yield advance
        except BaseException:
            bar.live.transient = True  # on failure the error line alone is what the user should see
            raise


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class ProgressBar:
    """The progress bar of a long job (train, finetune), as a context manager; on failure it vanishes, so the
    error line alone is what the user sees."""

    def __init__(self, label: str) -> None:
        self.bar = Progress(TextColumn(f"[bold]{label}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                            TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TextColumn("eta"),
                            TimeRemainingColumn(), console=err)
        self.task = None

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            self.bar.live.transient = True
        self.bar.__exit__(*exc)
