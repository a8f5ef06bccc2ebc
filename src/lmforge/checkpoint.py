"""Checkpoints that survive a kill at any moment.

A checkpoint is a folder:

    checkpoints/step_00000200/
      model.safetensors   weights (tied tensors stored once, aliases listed in checkpoint.json)
      state.pt            optimizer states, step, data-loader position, RNG states, meter totals
      config.yaml         the resolved RunConfig, so the folder explains and repeats the run on its own
      tokenizer.json      the tokenizer, so the folder alone is enough to generate or serve
      checkpoint.json     written last: step, model shape, and the size and sha256 of every other file

Writing goes to `.tmp-step_...`, every file and the folder are fsynced, then the folder is renamed into place and
the parent fsynced. A kill before the rename leaves only a temp folder (ignored and later removed); a kill after it
leaves a complete checkpoint. Loading checks sizes and hashes, so truncation or bit rot is an error, not garbage.

This module is the checkpoint format, shared by training (writes, resumes) and inference (eval, generate, serve).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from lmforge.atomic import fsync_path
from lmforge.config import RunConfig, config_from_dict
from lmforge.data.chat import CHAT_TEMPLATE_FILE, DEFAULT_CHAT_TEMPLATE
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import CheckpointError
from lmforge.model.transformer import Transformer, TransformerShape

FORMAT_VERSION = 1
META = "checkpoint.json"
WEIGHTS = "model.safetensors"
STATE = "state.pt"
CONFIG = "config.yaml"
TOKENIZER = "tokenizer.json"


@dataclass
class Checkpoint:
    path: Path
    step: int
    model_state: dict[str, torch.Tensor]
    train_state: dict[str, Any]
    config: str  # YAML text of the resolved RunConfig
    meta: dict[str, Any]


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _write_file(path: Path, data: bytes) -> dict[str, Any]:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _dedupe_shared(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses tensors that share memory (tied embeddings): store each once, remember the aliases."""
    first_by_ptr: dict[tuple[int, int, tuple[int, ...]], str] = {}
    unique, aliases = {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in first_by_ptr:
            aliases[name] = first_by_ptr[key]
        else:
            first_by_ptr[key] = name
            unique[name] = t.detach().contiguous().cpu()
    return unique, aliases


def save_checkpoint(checkpoints_dir: Path, step: int, model_state: dict[str, torch.Tensor],
                    train_state: dict[str, Any], config_yaml: str, tokenizer_json: bytes,
                    extra_meta: dict[str, Any], keep_last: int) -> Path:
    """Write a checkpoint atomically and keep only the newest `keep_last`. Returns its folder."""
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoints_dir / step_dir_name(step)
    tmp = checkpoints_dir / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        tensors, aliases = _dedupe_shared(model_state)
        state_buffer = io.BytesIO()
        torch.save(train_state, state_buffer)
        files = {
            WEIGHTS: _write_file(tmp / WEIGHTS, save_safetensors(tensors)),
            STATE: _write_file(tmp / STATE, state_buffer.getvalue()),
            CONFIG: _write_file(tmp / CONFIG, config_yaml.encode()),
            TOKENIZER: _write_file(tmp / TOKENIZER, tokenizer_json),
            CHAT_TEMPLATE_FILE: _write_file(tmp / CHAT_TEMPLATE_FILE, DEFAULT_CHAT_TEMPLATE.encode()),
        }
        meta = {"format_version": FORMAT_VERSION, "step": step, "files": files, "aliases": aliases, **extra_meta}
        _write_file(tmp / META, json.dumps(meta, indent=2).encode())
        fsync_path(tmp)
        if final.exists():  # re-saving a step (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_path(checkpoints_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(checkpoints_dir)
        kept = f"the previous checkpoint {previous.name} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointError(
            f"could not write checkpoint {final.name} in {checkpoints_dir}: {e.strerror or e}; {kept}; "
            f"free disk space and resume with --resume"
        ) from None
    _prune(checkpoints_dir, keep_last)
    return final


def _prune(checkpoints_dir: Path, keep_last: int) -> None:
    for old in list_checkpoints(checkpoints_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in checkpoints_dir.glob(".tmp-*"):  # left by a process killed mid-write
        shutil.rmtree(tmp, ignore_errors=True)


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete checkpoints (renamed into place), oldest first."""
    if not checkpoints_dir.is_dir():
        return []
    return sorted(p for p in checkpoints_dir.glob("step_*") if p.is_dir())


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    found = list_checkpoints(checkpoints_dir)
    return found[-1] if found else None


def read_meta(path: Path) -> dict[str, Any]:
    meta_path = path / META
    if not meta_path.is_file():
        raise CheckpointError(f"'{path}' is not a checkpoint folder (no {META}); pass a folder under runs/<run>/checkpoints")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint {path} is corrupted: {META} is not valid JSON; use an earlier checkpoint") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict):
        raise CheckpointError(f"checkpoint {path} is corrupted: {META} lacks its file list; use an earlier checkpoint")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {meta.get('format_version')}, this lmforge reads {FORMAT_VERSION}"
        )
    return meta


def _read_verified(path: Path, name: str, expected: dict[str, Any]) -> bytes:
    file = path / name
    if not file.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing; use an earlier checkpoint")
    data = file.read_bytes()
    if len(data) != expected["bytes"]:
        raise CheckpointError(
            f"checkpoint {path} is corrupted: {name} has {len(data)} bytes, expected {expected['bytes']} "
            f"(truncated?); use an earlier checkpoint"
        )
    if hashlib.sha256(data).hexdigest() != expected["sha256"]:
        raise CheckpointError(f"checkpoint {path} is corrupted: {name} fails its sha256 check; use an earlier checkpoint")
    return data


def load_checkpoint(path: Path, *, with_train_state: bool = True) -> Checkpoint:
    """Read and verify a checkpoint folder; CheckpointError on anything missing, truncated or altered."""
    path = Path(path)
    meta = read_meta(path)
    files = meta["files"]
    try:
        tensors = load_safetensors(_read_verified(path, WEIGHTS, files[WEIGHTS]))
        train_state: dict[str, Any] = {}
        if with_train_state:
            train_state = torch.load(io.BytesIO(_read_verified(path, STATE, files[STATE])), weights_only=True)
        config = _read_verified(path, CONFIG, files[CONFIG]).decode()
    except KeyError as e:
        raise CheckpointError(f"checkpoint {path} is corrupted: {META} lacks an entry for {e}") from None
    for alias, target in meta.get("aliases", {}).items():
        tensors[alias] = tensors[target]
    return Checkpoint(path, meta["step"], tensors, train_state, config, meta)


def read_config(path: Path) -> RunConfig:
    """The resolved config saved in a checkpoint, verified against its hash."""
    meta = read_meta(path)
    if CONFIG not in meta["files"]:
        raise CheckpointError(f"checkpoint {path} is corrupted: {META} lacks an entry for {CONFIG}")
    try:
        return config_from_dict(yaml.safe_load(_read_verified(path, CONFIG, meta["files"][CONFIG]).decode()))
    except (yaml.YAMLError, AttributeError, TypeError):
        raise CheckpointError(f"checkpoint {path} has an unreadable {CONFIG}; use an earlier checkpoint") from None


def resolve_checkpoint(ref: str, runs_dir: Path) -> Path:
    """A checkpoint folder from what a user typed: a run name, a run folder, or a checkpoint folder."""
    for candidate in (runs_dir / ref, Path(ref)):
        if (candidate / META).is_file():
            return candidate
        if candidate.is_dir():
            last = latest_checkpoint(candidate / "checkpoints")
            if last is not None:
                return last
            raise CheckpointError(f"run folder '{candidate}' has no complete checkpoint yet")
    raise CheckpointError(
        f"no checkpoint, run folder or run named '{ref}' (looked in {runs_dir}); `lmforge runs` lists runs"
    )


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Tokenizer
    config: RunConfig
    path: Path
    step: int
    chat_template: str


def load_tokenizer(path: Path) -> tuple[Tokenizer, str]:
    """A checkpoint's tokenizer and chat template, verified, without its weights."""
    files = read_meta(path)["files"]
    try:
        _read_verified(path, TOKENIZER, files[TOKENIZER])
    except KeyError as e:
        raise CheckpointError(f"checkpoint {path} is corrupted: {META} lacks an entry for {e}") from None
    chat = files.get(CHAT_TEMPLATE_FILE)  # checkpoints from before chat templates use the default
    template = _read_verified(path, CHAT_TEMPLATE_FILE, chat).decode() if chat else DEFAULT_CHAT_TEMPLATE
    return Tokenizer.load(path), template


def load_model(path: Path, device: torch.device | str = "cpu") -> LoadedModel:
    """A verified checkpoint as an eval-mode model with its tokenizer and config, ready for inference."""
    ckpt = load_checkpoint(path, with_train_state=False)
    tokenizer, template = load_tokenizer(path)
    config = config_from_dict(yaml.safe_load(ckpt.config))
    shape = TransformerShape(**ckpt.meta["shape"])
    model = Transformer(shape)
    model.load_state_dict(ckpt.model_state)
    model.to(device).eval()
    return LoadedModel(model, tokenizer, config, path, ckpt.step, template)
