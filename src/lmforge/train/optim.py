"""Optimizers: Muon for the 2-D weight matrices, AdamW for everything else.

Muon (Keller Jordan, 2024; used by modded-nanogpt and nanochat) takes SGD-momentum's update for a weight matrix and
replaces it with the nearest semi-orthogonal matrix, computed by a few Newton-Schulz iterations. Embeddings, the
output head and norm gains are not hidden-layer matrices in that sense and stay with AdamW.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from lmforge.config import TrainConfig


def orthogonalize(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately U @ V^T of G's SVD, by the quintic Newton-Schulz iteration of Muon.

    The coefficients (3.4445, -4.7750, 2.0315) maximise the slope at zero, so small singular values grow fast;
    the result has singular values roughly in [0.7, 1.2], which works as well as exact orthogonalisation.
    Runs in bf16 on GPU (fast and stable enough) and in fp32 on CPU (where bf16 matmuls are slower).
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.bfloat16() if G.is_cuda else G.float()
    transposed = X.size(-2) > X.size(-1)
    if transposed:  # iterate on the smaller Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X


class Muon(torch.optim.Optimizer):
    """Momentum with orthogonalised updates for 2-D parameters (Nesterov by default).

    Matrices of the same shape (every layer's q_proj, say) are orthogonalised together as one batch: on a GPU
    that turns a thousand small kernel launches per step into a few dozen large ones.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, weight_decay: float = 0.0,
                 nesterov: bool = True, ns_steps: int = 5):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      nesterov=nesterov, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
            by_shape: dict[torch.Size, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault(p.shape, []).append(p)
            for shape, params in by_shape.items():
                grads = [p.grad for p in params]
                buffers = []
                for p in params:
                    if "momentum_buffer" not in self.state[p]:
                        self.state[p]["momentum_buffer"] = torch.zeros_like(p.grad)
                    buffers.append(self.state[p]["momentum_buffer"])
                torch._foreach_lerp_(buffers, grads, 1 - momentum)
                G = torch.stack(buffers)  # (n, rows, cols)
                if group["nesterov"]:
                    G = torch.stack(grads).lerp_(G, momentum)
                update = orthogonalize(G, group["ns_steps"]).to(params[0].dtype)
                # Tall matrices get larger steps so the per-element update size does not shrink with fan-out.
                scale = max(1.0, shape[-2] / shape[-1]) ** 0.5
                if decay:
                    torch._foreach_mul_(params, 1 - lr * decay)
                torch._foreach_add_(params, update.unbind(0), alpha=-lr * scale)
        return None


def is_matrix_param(name: str, p: nn.Parameter) -> bool:
    """Hidden-layer weight matrices: what Muon is for (not the embedding table, not the output head)."""
    return p.ndim == 2 and "embed" not in name and "lm_head" not in name


def build_optimizers(model: nn.Module, cfg: TrainConfig, device_type: str) -> list[torch.optim.Optimizer]:
    """The optimizers for a model; each param group keeps its peak lr in 'initial_lr' for the schedule."""
    matrices, decayed, plain = [], [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        if cfg.optimizer == "muon" and is_matrix_param(name, p):
            matrices.append(p)
        elif p.ndim == 2 and "embed" not in name:
            decayed.append(p)
        else:
            plain.append(p)
    adamw_groups = [g for g in (dict(params=decayed, weight_decay=cfg.weight_decay),
                                dict(params=plain, weight_decay=0.0)) if g["params"]]
    sharded = any(isinstance(p, DTensor) for p in model.parameters())  # FSDP2: the fused kernel takes plain tensors
    adamw = torch.optim.AdamW(adamw_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                              fused=device_type in ("cuda", "cpu") and not sharded)  # one kernel, not one per tensor
    optimizers: list[torch.optim.Optimizer] = [adamw]
    if matrices:
        optimizers.append(Muon(matrices, lr=cfg.matrix_lr, momentum=cfg.muon_momentum,
                               weight_decay=cfg.weight_decay))
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers
