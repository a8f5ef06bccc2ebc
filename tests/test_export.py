"""Exporting ledger runs: TensorBoard event files and MLflow runs, read back with each tool's own reader."""

from __future__ import annotations

import math
import sys

import pytest

from conftest import CLI, expect_one_line_error
from lmforge.meter.ledger import Ledger

STEPS = (0, 10, 20, 30)


@pytest.fixture
def workspace(tmp_path):
    """A ledger with one finished synthetic training run: loss by step, an eval at the end, a summary."""
    ledger = Ledger(tmp_path / "ws" / "ledger.db")
    config = {"name": "synthetic", "model": {"depth": 2, "seq_len": 64}, "train": {"lr": 3e-3, "betas": [0.9, 0.95]}}
    run_id = ledger.start_run("synthetic", "train", config, {"device": "cpu", "threads": 2}, str(tmp_path / "run"))
    for step in STEPS:
        ledger.log_metrics(run_id, step, {"loss": 5.0 - step / 10, "time": step * 0.5})
    ledger.log_metrics(run_id, STEPS[-1], {"val_loss": 2.25, "val_bpb": 1.5})
    ledger.finish_run(run_id, "completed", summary={
        "steps": 30, "val_bpb": 1.5, "kwh": 2e-6, "energy_measured": False, "energy_label": "estimate: 65 W TDP",
        "predicted": {"val_loss": 2.5}})
    ledger.close()
    return tmp_path / "ws"


def test_tensorboard_export_reads_back(workspace, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator as PluginEvents

    code, out, _ = CLI(workspace, capsys)("runs", "export", "synthetic", "--to", "tensorboard", str(tmp_path / "tb"))
    assert code == 0 and "1 run(s)" in out
    events = EventAccumulator(str(tmp_path / "tb" / "synthetic"))
    events.Reload()
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == list(STEPS)
    assert [e.value for e in loss] == pytest.approx([5.0 - s / 10 for s in STEPS])
    assert loss[-1].wall_time - loss[0].wall_time == pytest.approx(15.0)  # start + the logged 'time' metric
    assert events.Scalars("summary/val_bpb")[0].value == pytest.approx(1.5)
    assert events.Scalars("summary/predicted.val_loss")[0].step == STEPS[-1]
    assert {"run/text_summary", "config/text_summary", "summary/text_summary"} <= set(events.Tags()["tensors"])
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "depth: 2" in config_text
    plugins = PluginEvents(str(tmp_path / "tb" / "synthetic"))
    plugins.Reload()
    assert "_hparams_/experiment" in plugins.PluginTagToContent("hparams")
    # exporting again replaces the run's event files instead of doubling its series
    CLI(workspace, capsys)("runs", "export", "1", "--to", "tensorboard", str(tmp_path / "tb"))
    assert len(list((tmp_path / "tb" / "synthetic").glob("events.out.tfevents.*"))) == 1


def test_mlflow_export_reads_back(workspace, tmp_path, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    store = tmp_path / "mlruns"
    cli = CLI(workspace, capsys)
    for _ in range(2):  # the second export replaces the first
        code, out, _ = cli("runs", "export", "synthetic", "--to", "mlflow", f"file:{store}")
        assert code == 0 and "1 run(s)" in out
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 wants it to read a file store
    client = MlflowClient(tracking_uri=store.as_uri())
    [run] = client.search_runs([client.get_experiment_by_name("lmforge").experiment_id])
    assert run.info.run_name == "synthetic" and run.info.status == "FINISHED"
    assert run.data.params["model.depth"] == "2" and run.data.params["train.betas"] == "[0.9, 0.95]"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == \
        [(s, pytest.approx(5.0 - s / 10)) for s in STEPS]
    assert run.data.metrics["summary/val_bpb"] == pytest.approx(1.5)
    assert math.isclose(run.data.metrics["val_loss"], 2.25)
    tags = run.data.tags
    assert tags["lmforge.kind"] == "train" and tags["lmforge.status"] == "completed"
    assert tags["lmforge.energy"] == "estimate" and tags["hardware.device"] == "cpu"


def test_bad_input_is_one_line(workspace, tmp_path, capsys, monkeypatch):
    cli = CLI(workspace, capsys)
    code, _, err = cli("runs", "export", "synthetc", "--to", "tensorboard", str(tmp_path / "tb"))
    expect_one_line_error(code, err, "no run named 'synthetc'.*did you mean 'synthetic'")
    assert not (tmp_path / "tb").exists()  # nothing written before every run is found
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, _, err = cli("runs", "export", "synthetic", "--to", "tensorboard", str(blocker / "tb"))
    expect_one_line_error(code, err, "cannot write TensorBoard event files to .*choose a writable folder")
    code, _, err = cli("runs", "export", "synthetic", "--to", "wandb", "x")
    expect_one_line_error(code, err, "--to wandb is not an export target")
    code, _, err = cli("runs", "export", "synthetic")
    expect_one_line_error(code, err, "needs a target")

    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if mlflow-skinny were not installed
    code, _, err = cli("runs", "export", "synthetic", "--to", "mlflow", str(tmp_path / "mlruns"))
    expect_one_line_error(code, err, r"pip install 'lmforge\[mlflow\]'")
