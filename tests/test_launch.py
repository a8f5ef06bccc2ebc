"""`lmforge launch slurm|skypilot`: the job files parse, start torchrun with the right flags, carry the resolved
config, refuse to overwrite, and reject bad input with one line.

The generated scripts are not only checked with `bash -n`: they run under bash with stub `scontrol`, `srun` and
`torchrun` commands, and the arguments that reach torchrun are parsed by torchrun's own argument parser and then
by lmforge's, so quoting mistakes show up as wrong values.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import REPO, expect_one_line_error
from torch.distributed.run import get_args_parser

from lmforge.cli import build_parser
from lmforge.config import load_config
from lmforge.dist.launch import heredoc

DEMO = str(REPO / "src" / "lmforge" / "configs" / "demo.yaml")
# demo.yaml, a run name and a step limit given as flags: what every test's job must carry
RUN = ["--config", DEMO, "--name", "job-test", "--train.max_steps", "500", "--model.depth", "3"]
RESOLVED = load_config(DEMO, {"name": "job-test", "train.max_steps": "500", "model.depth": "3"})

STUBS = {
    "scontrol": 'printf "node-a\\nnode-b\\n"',  # `scontrol show hostnames LIST`: one host per line
    "srun": 'exec "$@"',  # one node is enough to see what every node would run
    "torchrun": 'printf "%s\\0" "$@" > "$TORCHRUN_ARGS"',  # NUL-separated, so any argument survives
}


def stub_path(tmp_path: Path) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in STUBS.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


def run_bash(script: str, tmp_path: Path, env: dict[str, str]) -> list[str]:
    """Run `script` with the stubs; the arguments torchrun received."""
    args_file = tmp_path / "torchrun.args"
    result = subprocess.run(["bash", "-c", script], check=False, env={**os.environ, "PATH": stub_path(tmp_path),
                            "TORCHRUN_ARGS": str(args_file), **env}, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    return args_file.read_text().split("\0")[:-1]


def lmforge_args(torchrun_args: list[str]) -> tuple[object, object]:
    """(torchrun's parsed args, lmforge's parsed args) for `torchrun ... -m lmforge ...`."""
    launcher = get_args_parser().parse_args(torchrun_args)
    assert launcher.module and launcher.training_script == "lmforge"
    return launcher, build_parser().parse_args(launcher.training_script_args)


def bash_syntax_ok(script: str) -> None:
    result = subprocess.run(["bash", "-n"], check=False, input=script, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def slurm_env(tmp_path: Path) -> dict[str, str]:
    return {"SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_NNODES": "2",
            "SLURM_JOB_NAME": "job-test", "SLURM_SUBMIT_DIR": str(tmp_path)}


# --- Slurm ---------------------------------------------------------------------------------------------------

def test_slurm_script_and_config_beside_it(cli, tmp_path):
    out = tmp_path / "job.sbatch"
    code, stdout, err = cli("launch", "slurm", *RUN, "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu",
                            "--account", "proj1", "--time", "02:00:00", "--out", str(out))
    assert code == 0 and stdout == "" and "sbatch" in err
    script = out.read_text()
    bash_syntax_ok(script)
    assert script.startswith("#!/bin/bash\n")
    sbatch = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert sbatch == ["#SBATCH --job-name=job-test", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
                      "#SBATCH --gpus-per-node=4", "#SBATCH --cpus-per-task=32", "#SBATCH --time=02:00:00",
                      "#SBATCH --partition=gpu", "#SBATCH --account=proj1", f"#SBATCH --output={tmp_path}/%x-%j.out"]
    first_command = next(i for i, line in enumerate(script.splitlines()) if line and not line.startswith("#"))
    assert first_command > script.splitlines().index(sbatch[-1])  # sbatch stops reading at the first command
    assert 'HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)' in script
    for flag in ("srun torchrun", "--rdzv-backend c10d", '--rdzv-id "$SLURM_JOB_ID"', '--nnodes "$SLURM_NNODES"',
                 "--nproc-per-node 4", '--rdzv-endpoint "$HEAD:$PORT"', "-m lmforge"):
        assert flag in script
    config = tmp_path / "job.config.yaml"
    assert load_config(config) == RESOLVED  # the job's config is the resolved one, loadable as is

    launcher, train = lmforge_args(run_bash(script, tmp_path, slurm_env(tmp_path)))
    assert (launcher.nnodes, launcher.nproc_per_node, launcher.rdzv_backend) == ("2", "4", "c10d")
    assert (launcher.rdzv_id, launcher.rdzv_endpoint) == ("1234", "node-a:29734")  # 29500 + 1234 mod 1000
    assert train.verb == "train" and train.config == str(config)
    assert train.workspace == str((tmp_path / "ws").absolute())  # the --workspace lmforge launch ran with


def test_slurm_script_on_stdout_carries_its_config(cli, tmp_path):
    workspace = tmp_path / "shared fs" / "it's here"  # spaces and quotes survive the shell
    source = "/data/$USER's `notes`\nrm -rf ~\nLMFORGE_CONFIG"  # nothing expands, no line ends the heredoc
    code, script, _ = cli("launch", "slurm", *RUN, "--nodes", "1", "--gpus-per-node", "8", "--port", "31000",
                          "--workspace-dir", str(workspace), "--train.max_time", "3600", "--data.source", source)
    assert code == 0
    bash_syntax_ok(script)
    assert "#SBATCH --time=01:15:00" in script  # max_time plus 15 minutes
    assert "#SBATCH --output=%x-%j.out" in script and "--partition" not in script
    launcher, train = lmforge_args(run_bash(script, tmp_path, slurm_env(tmp_path)))
    assert launcher.rdzv_endpoint == "node-a:31000" and train.workspace == str(workspace)
    written = tmp_path / "job-test-1234.config.yaml"  # beside the job's log, in the submit directory
    assert train.config == str(written)
    assert load_config(written) == load_config(DEMO, {"name": "job-test", "train.max_steps": "500",
                                                      "model.depth": "3", "train.max_time": "3600",
                                                      "data.source": source})


def test_slurm_fixes_an_empty_run_name(cli, tmp_path):
    code, script, _ = cli("launch", "slurm", "--config", DEMO, "--nodes", "1", "--gpus-per-node", "1")
    assert code == 0
    run_bash(script, tmp_path, slurm_env(tmp_path))
    saved = load_config(tmp_path / "job-test-1234.config.yaml")
    assert saved.name.startswith("stdlib-d2-")  # fixed at launch: every node writes to the same run folder
    assert f"#SBATCH --job-name={saved.name}" in script


def test_slurm_diloco_sites(cli):
    code, script, _ = cli("launch", "slurm", *RUN, "--nodes", "2", "--gpus-per-node", "4", "--sites", "2",
                          "--sync-every", "100", "--link", "starlink")
    assert code == 0 and "DiLoCo, 2 sites of 4 processes" in script
    assert "  count: 2\n  sync_every: 100\n" in script and "link: starlink" in script


def test_out_refuses_to_overwrite(cli, tmp_path):
    out = tmp_path / "job.sbatch"
    args = ("launch", "slurm", *RUN, "--nodes", "1", "--gpus-per-node", "2", "--out", str(out))
    assert cli(*args)[0] == 0
    out.write_text("mine")
    code, _, err = cli(*args)
    expect_one_line_error(code, err, r"job.sbatch exists; pass --force")
    assert out.read_text() == "mine"
    out.unlink()  # the config beside it is protected too
    expect_one_line_error(*cli(*args)[::2], r"job.config.yaml exists; pass --force")
    assert not out.exists()
    assert cli(*args, "--force")[0] == 0 and out.read_text().startswith("#!/bin/bash")


def test_heredoc_delimiter_never_ends_the_text_early(tmp_path):
    text = "a: 1\nLMFORGE_CONFIG\n$HOME `x`\n"
    target = tmp_path / "out.yaml"
    subprocess.run(["bash", "-c", "\n".join(heredoc(shlex.quote(str(target)), text))], check=True)
    assert target.read_text() == text


# --- SkyPilot ------------------------------------------------------------------------------------------------

def test_skypilot_task(cli, tmp_path):
    out = tmp_path / "task.yaml"
    code, _, err = cli("launch", "skypilot", *RUN, "--nodes", "2", "--accelerators", "H100:8", "--cloud", "aws",
                       "--out", str(out))
    assert code == 0 and "sky launch -c job-test" in err
    task = yaml.safe_load(out.read_text())
    assert task["num_nodes"] == 2 and task["resources"] == {"accelerators": "H100:8", "infra": "aws"}
    assert task["workdir"] == "." and "pip install -e ." in task["setup"]
    tokenizer = RESOLVED.tokenizer_name()
    local = (tmp_path / "ws").absolute()
    assert task["file_mounts"] == {f"~/lmforge-work/tokenizers/{tokenizer}": f"{local}/tokenizers/{tokenizer}",
                                   f"~/lmforge-work/shards/{tokenizer}": f"{local}/shards/{tokenizer}"}
    for name in ("SKYPILOT_NODE_RANK", "SKYPILOT_NODE_IPS", "SKYPILOT_NUM_NODES", "SKYPILOT_NUM_GPUS_PER_NODE"):
        assert name in task["run"]
    bash_syntax_ok(task["run"])

    env = {"HOME": str(tmp_path), "SKYPILOT_NODE_IPS": "10.0.0.5\n10.0.0.6\n", "SKYPILOT_NUM_NODES": "2",
           "SKYPILOT_NODE_RANK": "1", "SKYPILOT_NUM_GPUS_PER_NODE": "8"}
    launcher, train = lmforge_args(run_bash(task["run"], tmp_path, env))
    assert (launcher.nnodes, launcher.nproc_per_node, launcher.node_rank) == ("2", "8", 1)
    assert (launcher.master_addr, launcher.master_port) == ("10.0.0.5", 29500)
    assert train.workspace == "~/lmforge-work"  # lmforge expands ~ itself
    assert load_config(train.config) == RESOLVED and train.config.startswith(str(tmp_path))


def test_skypilot_on_stdout(cli):
    code, text, _ = cli("launch", "skypilot", *RUN, "--nodes", "1", "--accelerators", "A100",
                        "--data.source", "notes\nnum_nodes: 9")  # a newline in a comment must not end it
    task = yaml.safe_load(text)
    assert code == 0 and task["num_nodes"] == 1 and task["resources"] == {"accelerators": "A100:1"}


# --- bad input -----------------------------------------------------------------------------------------------

SLURM = ("launch", "slurm", *RUN, "--nodes", "2", "--gpus-per-node", "4")
SKY = ("launch", "skypilot", *RUN, "--nodes", "2", "--accelerators", "H100:8")


@pytest.mark.parametrize("args, pattern", [
    ((*SLURM, "--sites", "3"), r"--sites.count 3 does not divide the 8 processes \(2 nodes x 4 GPUs\)"),
    ((*SKY, "--sites.count", "3"), r"--sites.count 3 does not divide the 16 processes"),
    (("launch", "slurm", *RUN, "--nodes", "0", "--gpus-per-node", "4"), r"--nodes must be at least 1, got 0"),
    (("launch", "slurm", *RUN, "--nodes", "1", "--gpus-per-node", "0"), r"--gpus-per-node must be at least 1"),
    (("launch", "slurm", *RUN, "--gpus-per-node", "4"), r"--nodes"),
    (("launch", "slurm", "--config", DEMO, "--nodes", "1", "--gpus-per-node", "1", "--train.max_time", "0"),
     r"no stop condition"),
    ((*SLURM, "--time", "2h"), r"--time '2h' is not a Slurm time"),
    ((*SLURM, "--time", "30", "--train.max_time", "3600"), r"not longer than --train.max_time 3600"),
    ((*SLURM, "--partition", "gpu; rm -rf ~"), r"--partition 'gpu; rm -rf ~' has characters"),
    ((*SLURM, "--port", "80"), r"--port must be in 1024..65535, got 80"),
    ((*SLURM, "--cpus-per-task", "0"), r"--cpus-per-task must be at least 1"),
    ((*SLURM, "--train.lrr", "1"), r"unknown option --train.lrr; did you mean --train.lr"),
    ((*SLURM, "--out", "/no/such/dir/job.sbatch"), r"folder of --out /no/such/dir/job.sbatch does not exist"),
    ((*SLURM, "--out", "/tmp"), r"--out /tmp is a folder"),
    (("launch", "skypilot", *RUN, "--nodes", "2", "--accelerators", "H100:x"), r"--accelerators 'H100:x' is not"),
    (("launch", "skypilot", *RUN, "--nodes", "2", "--accelerators", "H100:0"), r"--accelerators 'H100:0' is not"),
    ((*SKY, "--workspace-dir", "relative/ws"), r"--workspace-dir 'relative/ws' must be absolute"),
    ((*SKY, "--cloud", "AWS please"), r"--cloud 'AWS please' is not a SkyPilot infra name"),
    (("launch", "kubernetes"), r"invalid choice: 'kubernetes'"),
])
def test_bad_input(cli, args, pattern):
    code, out, err = cli(*args)
    expect_one_line_error(code, err, pattern)
    assert out == ""


def test_out_folder_that_sbatch_cannot_name(cli, tmp_path):
    folder = tmp_path / "my jobs"
    folder.mkdir()
    code, _, err = cli(*SLURM, "--out", str(folder / "job.sbatch"))
    expect_one_line_error(code, err, r"no spaces or quotes")
    assert list(folder.iterdir()) == []


def test_help(capsys):
    from lmforge.cli import main

    for args in (["launch", "--help"], ["launch", "slurm", "--help"], ["launch", "skypilot", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--gpus-per-node" in text and "--accelerators" in text and "--train.max_steps" in text


def test_the_docs_commands_run(cli, tmp_path, monkeypatch):
    """docs/scale-out.md's `lmforge launch` examples, with the demo config as my.yaml."""
    section = (REPO / "docs" / "scale-out.md").read_text().split("## Launching on a cluster")[1]
    commands = [line for line in section.splitlines() if line.startswith("lmforge launch ")]
    assert len(commands) == 2
    monkeypatch.chdir(tmp_path)
    for command in commands:
        code, _, err = cli(*shlex.split(command.replace("my.yaml", DEMO))[1:])
        assert code == 0, err
    bash_syntax_ok((tmp_path / "job.sbatch").read_text())
    assert yaml.safe_load((tmp_path / "task.yaml").read_text())["num_nodes"] == 2
