"""LoRA: low-rank adapters on a frozen model's linear layers, applied from outside the model file.

Hu et al. 2021 (https://arxiv.org/abs/2106.09685): a frozen weight W (out, in) gets a trainable update
(alpha / r) * B @ A with A (r, in) and B (out, r), B starting at zero so the wrapped model begins exactly as the
base one. `apply_lora` replaces the chosen nn.Linear modules in place by `LoRALinear` wrappers and freezes every
other parameter; `merged_state_dict` folds the adapters back into plain weights under the model's own names, so
a fine-tuned checkpoint is an ordinary one that generate, serve and export load unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# the attention and MLP projections of model/transformer.py (the embedding and lm_head stay frozen and unwrapped:
# the fused CPU loss reads lm_head.weight directly)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * x A^T B^T, the base layer frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        base.weight.requires_grad_(False)
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        device = base.weight.device
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=device))  # (r, in)
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=device))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # nn.Linear's own init, as the LoRA paper's code

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (B, T, in) -> (B, T, r) -> (B, T, out)
        return self.base(x) + (x @ self.lora_a.t().to(x.dtype)) @ self.lora_b.t().to(x.dtype) * self.scaling

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + (alpha / r) * B @ A, (out, in), in the base weight's dtype."""
        W = self.base.weight
        return (W.float() + self.scaling * (self.lora_b.float() @ self.lora_a.float())).to(W.dtype)


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: tuple[str, ...] = TARGETS) -> list[str]:
    """Freeze every parameter of `model` and wrap its nn.Linear modules named in `targets` with rank-`rank`
    adapters, in place. Returns the wrapped modules' names (e.g. 'blocks.0.attn.q_proj')."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1, got {rank}")
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear(child, rank, alpha))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    if not wrapped:
        raise ValueError(f"no nn.Linear named {', '.join(targets)} in the model to adapt")
    return wrapped


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict under its unwrapped names, adapters folded into the weights (the model unchanged)."""
    state = {}
    merged = {f"{name}.weight": m.merged_weight() for name, m in lora_modules(model).items()}
    for key, tensor in model.state_dict().items():
        if key.endswith((".lora_a", ".lora_b")):
            continue
        plain = key.replace(".base.weight", ".weight") if key.endswith(".base.weight") else key
        state[plain] = merged.get(plain, tensor)
    return state


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters alone: '<module>.lora_a' (r, in) and '<module>.lora_b' (out, r) per wrapped module."""
    state = {}
    for name, m in lora_modules(model).items():
        state[f"{name}.lora_a"] = m.lora_a.detach().contiguous().cpu()
        state[f"{name}.lora_b"] = m.lora_b.detach().contiguous().cpu()
    return state


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight and put the plain nn.Linear back, in place."""
    for name, m in lora_modules(model).items():
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        m.base.weight.copy_(m.merged_weight())
        setattr(parent, child_name, m.base)
