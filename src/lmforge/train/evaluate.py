"""Validation loss and bits per byte.

Bits per byte (bpb) divides the summed cross-entropy of the predicted tokens (in bits) by the number of UTF-8
bytes those tokens stand for, so runs with different tokenizers compare fairly. Special tokens (document
boundaries) stand for no bytes and are left out of both sums, as nanochat does.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch import nn

from lmforge.data.loader import iter_eval_batches
from lmforge.train.runtime import Runtime


@torch.no_grad()
def evaluate(model: nn.Module, tokens: np.ndarray, token_bytes: torch.Tensor, *, batch_size: int, seq_len: int,
             max_batches: int | None, runtime: Runtime,
             progress: Callable[[int, int | None], None] | None = None) -> dict[str, float]:
    """Mean loss (nats per token) and bpb over up to `max_batches` validation batches."""
    was_training = model.training
    model.eval()
    token_bytes = token_bytes.to(runtime.device)
    total_nats = torch.zeros((), dtype=torch.float64, device=runtime.device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=runtime.device)
    all_nats = torch.zeros((), dtype=torch.float64, device=runtime.device)
    n_tokens = 0
    for x, y in iter_eval_batches(tokens, batch_size, seq_len, max_batches):
        x, y = x.to(runtime.device), y.to(runtime.device)
        with runtime.autocast():
            nats = model(x, y, reduction="none").float()  # (B, T)
        nbytes = token_bytes[y]  # (B, T)
        counted = nbytes > 0
        total_nats += nats[counted].sum(dtype=torch.float64)
        total_bytes += nbytes.sum()
        all_nats += nats.sum(dtype=torch.float64)
        n_tokens += y.numel()
        if progress:
            progress(1, None)
    model.train(was_training)
    if n_tokens == 0:
        return {"loss": math.nan, "bpb": math.nan, "tokens": 0}
    return {
        "loss": all_nats.item() / n_tokens,
        "bpb": total_nats.item() / (math.log(2) * max(total_bytes.item(), 1)),
        "tokens": n_tokens,
    }
