"""`lmforge sweep`: an IsoFLOP grid of ordinary runs in the ledger, each stopped by its FLOP budget; a second call
skips what is done."""

from __future__ import annotations

from lmforge.cli import main
from lmforge.meter.ledger import Ledger


def test_sweep_trains_the_grid_once(prepared, capsys):
    workspace, data = prepared
    argv = ["--workspace", str(workspace), "sweep", *data, "--budgets", "3e9,6e9", "--depths", "1,2",
            "--prefix", "iso"]
    assert main(argv) == 0
    runs = {r["name"]: r for r in Ledger(workspace / "ledger.db").list_runs() if r["name"].startswith("iso-")}
    assert sorted(runs) == ["iso-c3e09-d1", "iso-c3e09-d2", "iso-c6e09-d1", "iso-c6e09-d2"]
    for name, r in runs.items():
        budget = float(name.split("-")[1][1:])
        s = r["summary"]
        # stopped by the budget: at the first step that reaches it
        assert r["status"] == "completed" and 0 <= s["flops"] - budget < s["flops"] / s["steps"] and s["val_loss"] > 0
        assert r["config"]["model"]["depth"] == int(name[-1])
    # at one budget the deeper model sees fewer tokens
    assert runs["iso-c6e09-d2"]["summary"]["tokens"] < runs["iso-c6e09-d1"]["summary"]["tokens"]
    capsys.readouterr()
    assert main(argv) == 0
    assert capsys.readouterr().err.count("already completed, skipped") == 4


def test_sweep_bad_lists(prepared, capsys):
    workspace, data = prepared
    assert main(["--workspace", str(workspace), "sweep", *data, "--budgets", "1e9,abc"]) == 2
    assert "--budgets takes comma-separated numbers" in capsys.readouterr().err
