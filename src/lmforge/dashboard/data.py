"""What the dashboard reads from the ledger: run rows for the table, one run in full, and step metrics since a step.

Runs come through `Ledger` (so a run whose process died shows as 'crashed', as in `lmforge runs`); step metrics come
through a second, read-only SQLite connection, because the page polls for the steps after the last one it has, and
`Ledger.get_metrics` returns every row of a run. Nothing here writes a metric, a request or a run.

A resumed run re-logs the steps after its last checkpoint; a page that already holds those steps keeps the first
values until it is reloaded.
"""

from __future__ import annotations

import math
import sqlite3
import threading
from pathlib import Path
from typing import Any

from lmforge.meter.ledger import BUSY_TIMEOUT_S, Ledger

MAX_STEPS_PER_PAGE = 5000  # steps in one metrics answer; the page asks again at once while `more` is true
CHART_METRICS = ("loss", "val_loss", "val_bpb")  # what the page draws; the API returns any names asked for


class LedgerView:
    """Read-only queries on the ledger at `path` for the dashboard's JSON endpoints."""

    def __init__(self, path: Path):
        self.ledger = Ledger(path)  # creates an empty ledger if none exists yet: the page then lists no runs
        self._lock = threading.Lock()  # endpoints run in a thread pool; one connection, one query at a time
        self._conn = sqlite3.connect(f"{Path(path).absolute().as_uri()}?mode=ro", uri=True,
                                     timeout=BUSY_TIMEOUT_S, check_same_thread=False)

    def close(self) -> None:
        self._conn.close()
        self.ledger.close()

    def _query(self, sql: str, args: tuple) -> list[tuple]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def runs(self, limit: int) -> list[dict[str, Any]]:
        """The newest `limit` runs as table rows."""
        return [self._row(run) for run in self.ledger.list_runs(limit=limit)]

    def run(self, ref: str) -> dict[str, Any]:
        """One run by name or id, in full (config, hardware, summary) with its table row; LmforgeError if unknown."""
        run = self.ledger.get_run(ref)
        names = [name for (name,) in self._query("SELECT DISTINCT name FROM metrics WHERE run_id = ?", (run["id"],))]
        return {**run, "row": self._row(run), "metric_names": sorted(names)}

    def _row(self, run: dict[str, Any]) -> dict[str, Any]:
        """What the runs table shows; a running run has no summary yet, so steps and val bpb come from its metrics."""
        s = run.get("summary") or {}
        steps, val_bpb = s.get("steps"), s.get("val_bpb")
        if steps is None:
            steps = self._query("SELECT MAX(step) FROM metrics WHERE run_id = ?", (run["id"],))[0][0]
        if val_bpb is None:
            last = self._query("SELECT value FROM metrics WHERE run_id = ? AND name = 'val_bpb' "
                               "ORDER BY step DESC LIMIT 1", (run["id"],))
            val_bpb = last[0][0] if last else None
        return {"id": run["id"], "name": run["name"], "kind": run["kind"], "status": run["status"],
                "created_at": run["created_at"], "updated_at": run["updated_at"], "steps": steps,
                "val_bpb": finite(val_bpb), "energy_j": finite(s.get("energy_j")),
                "energy_measured": s.get("energy_measured"), "cost_usd": finite(s.get("cost_usd"))}

    def metrics(self, run_id: int, since: int, names: tuple[str, ...]) -> dict[str, Any]:
        """Steps after `since` with the named metrics, columnar as a chart takes them: {"steps": [s, ...],
        "series": {name: [value or None, ...]}, "last_step": s or since, "more": bool}. A metric not logged at a
        step (val_bpb between evaluations) and a NaN are None."""
        marks = ", ".join("?" * len(names))
        # 1. the last step of this page: at most MAX_STEPS_PER_PAGE steps that have any of the names
        (upto, count), = self._query(
            f"SELECT MAX(step), COUNT(*) FROM (SELECT DISTINCT step FROM metrics WHERE run_id = ? AND step > ? "
            f"AND name IN ({marks}) ORDER BY step LIMIT ?)", (run_id, since, *names, MAX_STEPS_PER_PAGE))
        if upto is None:
            return {"steps": [], "series": {name: [] for name in names}, "last_step": since, "more": False}
        # 2. the values, pivoted into one column per name
        rows = self._query(f"SELECT step, name, value FROM metrics WHERE run_id = ? AND step > ? AND step <= ? "
                           f"AND name IN ({marks}) ORDER BY step", (run_id, since, upto, *names))
        index: dict[int, int] = {}
        series: dict[str, list[float | None]] = {name: [] for name in names}
        for step, name, value in rows:
            if step not in index:
                index[step] = len(index)
                for column in series.values():
                    column.append(None)
            series[name][index[step]] = finite(value)
        return {"steps": list(index), "series": series, "last_step": upto, "more": count == MAX_STEPS_PER_PAGE}


def finite(value: Any) -> float | None:
    """A number JSON can carry: NaN, infinities and missing values become None."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
