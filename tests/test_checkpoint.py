"""Checkpoint format: atomic writes, verification, pruning, and a full disk that leaves the last one intact."""

import errno
import os
import subprocess
import uuid

import pytest
import torch

from lmforge.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, resolve_checkpoint, save_checkpoint
from lmforge.errors import CheckpointError


def tiny_state(seed=0, tied=False):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(16, 8, generator=g)
    state = {"embed.weight": emb, "block.w": torch.randn(8, 8, generator=g)}
    state["lm_head.weight"] = emb if tied else torch.randn(16, 8, generator=g)
    return state


def save(dir, step, state=None, keep_last=3):
    state = state if state is not None else tiny_state(step)
    return save_checkpoint(dir, step, state, {"step": step, "opt": [torch.ones(3)]}, "name: x\n", b'{"tok": 1}',
                           {"shape": {"d": 8}}, keep_last)


def test_roundtrip_and_tied_aliases(tmp_path):
    state = tiny_state(tied=True)
    path = save(tmp_path, 5, state)
    ckpt = load_checkpoint(path)
    assert ckpt.step == 5 and ckpt.config == "name: x\n" and ckpt.meta["shape"] == {"d": 8}
    assert ckpt.meta["aliases"] == {"lm_head.weight": "embed.weight"}
    for k, v in state.items():
        assert torch.equal(ckpt.model_state[k], v)
    assert torch.equal(ckpt.train_state["opt"][0], torch.ones(3))


def test_keep_last_and_temp_folders_ignored(tmp_path):
    for step in (1, 2, 3, 4):
        save(tmp_path, step, keep_last=2)
    (tmp_path / ".tmp-step_00000005-123").mkdir()  # what a kill mid-write leaves
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    assert latest_checkpoint(tmp_path).name == "step_00000004"
    save(tmp_path, 6, keep_last=2)
    assert not list(tmp_path.glob(".tmp-*"))  # cleaned on the next successful save


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_corruption_is_a_clear_error(tmp_path, damage):
    path = save(tmp_path, 1)
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "flip":
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(bytes(data[: len(data) // 2]))
    else:
        weights.unlink()
    with pytest.raises(CheckpointError, match="corrupted|incomplete") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)


def test_out_of_space_keeps_previous(tmp_path, monkeypatch):
    """Simulated ENOSPC in the middle of writing: clear error, no half folder, previous checkpoint loads."""
    good = save(tmp_path, 1)
    real_write = os.fsync
    calls = {"n": 0}

    def failing_fsync(fd):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(CheckpointError, match="No space left on device; the previous checkpoint step_00000001 is intact"):
        save(tmp_path, 2)
    monkeypatch.undo()
    assert list_checkpoints(tmp_path) == [good] and not list(tmp_path.glob(".tmp-*"))
    assert load_checkpoint(good).step == 1


def can_mount_tmpfs(path) -> bool:
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_real_full_disk_keeps_previous(tmp_path):
    """A real 256 KiB tmpfs: the first checkpoint fits, a larger second one cannot."""
    mount = tmp_path / f"small-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    if not can_mount_tmpfs(mount):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        good = save(mount, 1)
        big = {"w": torch.randn(256, 256)}  # 256 KiB of weights alone
        with pytest.raises(CheckpointError, match="the previous checkpoint step_00000001 is intact"):
            save(mount, 2, big)
        assert list_checkpoints(mount) == [good] and not list(mount.glob(".tmp-*"))
        assert load_checkpoint(good).step == 1
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_resolve_checkpoint(tmp_path):
    runs = tmp_path / "runs"
    path = save(runs / "r1" / "checkpoints", 3)
    assert resolve_checkpoint("r1", runs) == path
    assert resolve_checkpoint(str(runs / "r1"), runs) == path
    assert resolve_checkpoint(str(path), runs) == path
    with pytest.raises(CheckpointError, match="no checkpoint, run folder or run named 'nope'"):
        resolve_checkpoint("nope", runs)
    (runs / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no complete checkpoint"):
        resolve_checkpoint("empty", runs)
