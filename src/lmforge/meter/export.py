"""Export ledger runs to the trackers people already use: TensorBoard event files and MLflow runs.

Both are optional extras, imported only when an export asks for them:
    tensorboard  torch.utils.tensorboard's SummaryWriter (needs `pip install 'lmforge[tensorboard]'`); one folder
                 per run: every metric as a scalar series by step, config / summary / hardware as text, and the
                 config's scalars + the summary's numbers as hparams
    mlflow       MlflowClient (`mlflow-skinny`, `pip install 'lmforge[mlflow]'`); one MLflow run per lmforge run:
                 flattened config as params, every metric by step (log_batch), the summary's numbers as metrics
                 'summary/<key>' at the last step, name/kind/status/energy provenance and hardware as tags

A step's wall-clock time is the run's start plus the 'time' metric (seconds since start) the training loop logs;
steps without one reuse the last known time. Exporting a run again replaces its earlier export.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import math
import os
import re
import urllib.parse
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from lmforge.errors import LmforgeError
from lmforge.meter.ledger import Ledger

EXTRA_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow-skinny"}  # extra -> the package it installs
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")  # MLflow stores that need sqlalchemy
MLFLOW_STATUS = {"completed": "FINISHED", "failed": "FAILED", "crashed": "FAILED", "interrupted": "KILLED"}
MLFLOW_BATCH = 1000  # MlflowClient.log_batch takes at most 1000 metrics (and 100 params or tags) per call
MLFLOW_PARAM_BATCH = 100
MLFLOW_PARAM_CHARS = 6000  # MLflow's longest param value; a longer config value is cut, marked with '...'
MLFLOW_BAD_KEY = re.compile(r"[^/\w.\- ]")  # MLflow keys allow letters, digits, _ - . / and spaces


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'model': {'depth': 4}} -> {'model.depth': 4}; lists and other leaves stay as they are."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def summary_numbers(summary: dict[str, Any]) -> dict[str, float]:
    """The summary's finite numbers (not booleans), flattened, as 'summary/<key>'."""
    return {f"summary/{key}": float(value) for key, value in flatten(summary).items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}


def step_series(ledger: Ledger, run: dict) -> list[tuple[int, float, dict[str, float]]]:
    """(step, wall-clock seconds, {metric: value}) for every logged step, in step order."""
    by_step: dict[int, dict[str, float]] = {}
    for step, name, value in ledger.get_metrics(run["id"]):
        by_step.setdefault(step, {})[name] = value
    series, walltime = [], run["created_at"]
    for step, metrics in by_step.items():
        if math.isfinite(metrics.get("time", math.nan)):
            walltime = run["created_at"] + metrics["time"]
        series.append((step, walltime, metrics))
    return series


def energy_provenance(summary: dict[str, Any]) -> str:
    if summary.get("kwh") is None:
        return "none"
    return "measured" if summary.get("energy_measured") else "estimate"


def resolve_runs(ledger: Ledger, refs: Sequence[str]) -> list[dict]:
    """Every run named, looked up before anything is written (an unknown name fails the whole export)."""
    return [ledger.get_run(ref) for ref in refs]


def require(module: str, extra: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise LmforgeError(f"exporting to {extra} needs the optional package {EXTRA_PACKAGES[extra]}, which is not "
                           f"installed; pip install 'lmforge[{extra}]'") from e


def writable_dir(path: Path, what: str) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".lmforge-write-test"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise LmforgeError(f"cannot write {what} to {path}: {e.strerror or e}; choose a writable folder") from e
    return path.resolve()


# -- TensorBoard --


def export_tensorboard(ledger: Ledger, refs: Sequence[str], log_dir: Path) -> list[Path]:
    """Write each run's event files to log_dir/<run name>/ (earlier event files there are replaced); the folders."""
    runs = resolve_runs(ledger, refs)
    tensorboard = require("torch.utils.tensorboard", "tensorboard")
    hparams = require("torch.utils.tensorboard.summary", "tensorboard").hparams
    root = writable_dir(Path(log_dir), "TensorBoard event files")
    folders = []
    for run in runs:
        folder = root / run["name"].replace(os.sep, "_")
        folder.mkdir(exist_ok=True)
        for old in folder.glob("events.out.tfevents.*"):
            old.unlink()
        writer = tensorboard.SummaryWriter(log_dir=str(folder))
        try:
            write_tensorboard_run(writer, hparams, ledger, run)
        finally:
            writer.close()
        folders.append(folder)
    return folders


def write_tensorboard_run(writer: Any, hparams: Any, ledger: Ledger, run: dict) -> None:
    series = step_series(ledger, run)
    for step, walltime, metrics in series:
        for name, value in metrics.items():
            writer.add_scalar(name, value, step, walltime=walltime)
    last_step, last_time = (series[-1][0], series[-1][1]) if series else (0, run["ended_at"] or run["created_at"])
    finals = summary_numbers(run["summary"])
    for name, value in finals.items():
        writer.add_scalar(name, value, last_step, walltime=last_time)
    header = {"name": run["name"], "kind": run["kind"], "status": run["status"],
              "energy": energy_provenance(run["summary"])}
    for tag, tree in (("run", header), ("config", run["config"]), ("summary", run["summary"]),
                      ("hardware", run["hardware"])):
        if tree:  # indented four spaces: TensorBoard's markdown shows a code block
            text = yaml.safe_dump(tree, sort_keys=False, default_flow_style=False)
            writer.add_text(tag, "\n".join("    " + line for line in text.splitlines()), last_step, last_time)
    params = {key: value if isinstance(value, (int, float, str, bool)) else str(value)
              for key, value in flatten(run["config"]).items()}
    if params:
        # the hparams plugin's three summaries, written beside the scalars they refer to (add_hparams would put
        # them in a new sub-folder)
        file_writer = writer._get_file_writer()
        for summary in hparams(params, finals):
            file_writer.add_summary(summary, last_step, last_time)


# -- MLflow --


@contextlib.contextmanager
def file_store_allowed() -> Iterator[None]:
    """MLflow 3 refuses its file store unless MLFLOW_ALLOW_FILE_STORE is set; naming a folder is opting in.

    The store is re-opened on every client call, so the variable stays set for the whole export.
    """
    before = os.environ.get("MLFLOW_ALLOW_FILE_STORE")
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        yield
    finally:
        if before is None:
            del os.environ["MLFLOW_ALLOW_FILE_STORE"]
        else:
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = before


def tracking_uri_of(target: str) -> str:
    """A folder ('mlruns', 'file:./mlruns') as an absolute file:// URI, checked writable; other URIs unchanged."""
    parsed = urllib.parse.urlparse(target)
    if parsed.scheme.split("+")[0] in DATABASE_SCHEMES and importlib.util.find_spec("sqlalchemy") is None:
        raise LmforgeError(f"an MLflow database store ({target!r}) needs the full mlflow package, not mlflow-skinny; "
                           f"pip install mlflow, or pass a folder (file:./mlruns)")
    if parsed.scheme not in ("", "file"):
        return target
    folder = Path(urllib.parse.unquote(parsed.path) if parsed.scheme else target)
    return writable_dir(folder, "an MLflow file store").as_uri()


def mlflow_key(name: str) -> str:
    return MLFLOW_BAD_KEY.sub("_", name)[:250]


def run_key(run: dict) -> str:
    """The run's identity in MLflow (name + start time, hashed: safe to quote in a filter string)."""
    return hashlib.sha256(f"{run['name']}\n{run['created_at']!r}".encode()).hexdigest()[:16]


def export_mlflow(ledger: Ledger, refs: Sequence[str], target: str, experiment: str = "lmforge") -> list[str]:
    """Log each run as an MLflow run of `experiment` at `target` (a folder or tracking URI); the MLflow run ids."""
    runs = resolve_runs(ledger, refs)
    require("mlflow", "mlflow")
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = tracking_uri_of(target)
    with file_store_allowed():
        try:
            client = MlflowClient(tracking_uri=uri)
            found = client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else client.create_experiment(experiment)
        except (MlflowException, ImportError) as e:
            detail = f"needs the package {e.name!r} (pip install mlflow)" if isinstance(e, ImportError) else \
                str(e).strip().split(". ")[0]
            raise LmforgeError(f"cannot open the MLflow tracking store {target!r}: {detail}; pass a folder "
                               f"(file:./mlruns) or a tracking server's http:// URI to --to mlflow") from e
        return [log_mlflow_run(client, experiment_id, ledger, run) for run in runs]


def log_mlflow_run(client: Any, experiment_id: str, ledger: Ledger, run: dict) -> str:
    from mlflow.entities import Metric, Param, RunTag

    key = run_key(run)
    for old in client.search_runs([experiment_id], filter_string=f"tags.`lmforge.run_key` = '{key}'"):
        client.delete_run(old.info.run_id)
    summary = run["summary"]
    tags = {"lmforge.run_key": key, "lmforge.name": run["name"], "lmforge.kind": run["kind"],
            "lmforge.status": run["status"], "lmforge.ledger": str(ledger.path), "lmforge.run_dir": run["run_dir"],
            "lmforge.energy": energy_provenance(summary), "lmforge.energy_label": summary.get("energy_label"),
            **{f"hardware.{k}": v for k, v in flatten(run["hardware"]).items()}}
    created = client.create_run(experiment_id, start_time=int(run["created_at"] * 1000), run_name=run["name"],
                                tags={mlflow_key(k): str(v)[:8000] for k, v in tags.items() if v is not None})
    run_id = created.info.run_id

    params = [Param(mlflow_key(k), str(v) if len(str(v)) <= MLFLOW_PARAM_CHARS else str(v)[:MLFLOW_PARAM_CHARS - 3]
                    + "...") for k, v in flatten(run["config"]).items()]
    for i in range(0, len(params), MLFLOW_PARAM_BATCH):
        client.log_batch(run_id, params=params[i:i + MLFLOW_PARAM_BATCH])

    series = step_series(ledger, run)
    metrics = [Metric(mlflow_key(name), value, int(walltime * 1000), step)
               for step, walltime, values in series for name, value in values.items()]
    last_step, last_time = (series[-1][0], series[-1][1]) if series else (0, run["ended_at"] or run["created_at"])
    metrics += [Metric(mlflow_key(name), value, int(last_time * 1000), last_step)
                for name, value in summary_numbers(summary).items()]
    for i in range(0, len(metrics), MLFLOW_BATCH):
        client.log_batch(run_id, metrics=metrics[i:i + MLFLOW_BATCH])

    if run["status"] in MLFLOW_STATUS:
        client.set_terminated(run_id, MLFLOW_STATUS[run["status"]], int((run["ended_at"] or last_time) * 1000))
    return run_id
