"""Where and how tensors run: device, precision, threads, determinism and compile.

Everything that is not the model's arithmetic but decides how it executes is set here, in one stated order,
from outside the model (the model file stays single-device eager code).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from lmforge.config import TrainConfig
from lmforge.errors import ConfigError


@dataclass
class Runtime:
    device: torch.device
    dtype: str  # "fp32" or "bf16" (the compute precision; weights stay fp32)
    compile: bool

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def resolve_device(name: str, flag: str = "--train.device") -> torch.device:
    """'auto' -> CUDA if present, else CPU; a GPU asked for where there is none is an error naming `flag`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{flag} {name} asks for a GPU but CUDA is not available; use {flag} cpu")
    return torch.device(name)


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """Apply the global torch settings a run needs; return where and in what precision it computes."""
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if dtype == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU has no bf16 support; use --train.dtype fp32")
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for any fp32 matmul left on GPU
    torch.backends.cudnn.allow_tf32 = True
    if cfg.deterministic and device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    compile_on = cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")
    return Runtime(device=device, dtype=dtype, compile=compile_on)


def prepare_model(model: nn.Module, runtime: Runtime) -> nn.Module:
    """Move to the device and apply compile; returns the module to call (the original keeps the weights)."""
    model.to(runtime.device)
    if runtime.compile:
        return torch.compile(model)
    return model
