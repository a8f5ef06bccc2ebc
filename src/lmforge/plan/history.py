"""What planning learns from the ledger's finished training runs: scaling points, measured MFU, bytes per token.

Losses are only comparable between runs on the same tokenizer and corpus, so every reader here takes the
tokenizer name (`RunConfig.tokenizer_name()`, e.g. 'stdlib-bpe4096') and ignores runs on any other.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from pathlib import Path

from lmforge.config import config_from_dict
from lmforge.errors import ConfigError
from lmforge.meter.ledger import Ledger
from lmforge.plan.scaling import ScalingPoint


def ledger_runs(ledger_path: Path) -> list[dict]:
    """The ledger's runs, or none when there is no ledger yet (planning a what-if creates no workspace)."""
    return Ledger(ledger_path).list_runs() if Path(ledger_path).is_file() else []


def run_tokenizer(run: dict) -> str | None:
    """The tokenizer a ledger run trained with; None when its saved config no longer loads."""
    try:
        return config_from_dict(run.get("config") or {}).tokenizer_name()
    except (ConfigError, TypeError, ValueError):
        return None


def finished_train_runs(runs: list[dict], tokenizer: str | None = None) -> list[dict]:
    """Completed training runs (of `tokenizer`, when given)."""
    done = [r for r in runs if r.get("kind") == "train" and r.get("status") == "completed"]
    return done if tokenizer is None else [r for r in done if run_tokenizer(r) == tokenizer]


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def scaling_points(runs: list[dict], tokenizer: str | None = None) -> list[ScalingPoint]:
    """One point per completed training run with non-embedding params, tokens and a validation loss."""
    points = []
    for r in finished_train_runs(runs, tokenizer):
        s = r.get("summary") or {}
        if all(_positive(s.get(k)) for k in ("non_embedding_params", "tokens", "val_loss")):
            points.append(ScalingPoint(n=float(s["non_embedding_params"]), d=float(s["tokens"]),
                                       loss=float(s["val_loss"]), name=r["name"]))
    return points


def most_common_tokenizer(runs: list[dict]) -> str | None:
    """The tokenizer with the most usable scaling points; None without any."""
    counts = Counter(run_tokenizer(r) for r in finished_train_runs(runs) if scaling_points([r]))
    counts.pop(None, None)
    return counts.most_common(1)[0][0] if counts else None


def measured_mfu(runs: list[dict], profile: str, depth: int | None = None) -> tuple[float, int] | None:
    """Median MFU of completed training runs on device profile `profile`, and how many runs; None if none.

    With `depth`, only runs of that depth count when there are any: MFU depends on the model's size (a 1-layer
    model spends more of its step outside matmuls), so the median over every size misjudges the small ones."""
    values = [(r["summary"]["mfu"], (r.get("config") or {}).get("model", {}).get("depth"))
              for r in finished_train_runs(runs)
              if (r.get("summary") or {}).get("profile") == profile and _positive(r["summary"].get("mfu"))]
    same = [mfu for mfu, d in values if d == depth]
    values = same or [mfu for mfu, _ in values]
    return (statistics.median(values), len(values)) if values else None


def bytes_per_token(runs: list[dict], tokenizer: str) -> float | None:
    """Bytes of text per token on `tokenizer`'s validation split, from runs that report both val loss and bpb.

    bpb = loss / ln 2 / (bytes per token), so bytes per token = loss / (bpb ln 2); the median over runs.
    """
    values = [s["val_loss"] / (s["val_bpb"] * math.log(2)) for r in finished_train_runs(runs, tokenizer)
              if _positive((s := r.get("summary") or {}).get("val_loss")) and _positive(s.get("val_bpb"))]
    return statistics.median(values) if values else None
