"""Muon, the optimizer split and the warm-up-stable-decay schedule."""

import torch
from torch import nn

from lmforge.config import TrainConfig
from lmforge.train.optim import Muon, build_optimizers, orthogonalize
from lmforge.train.schedule import lr_multiplier


def test_orthogonalize_gives_near_unit_singular_values():
    """Five Newton-Schulz steps put singular values near 1 (roughly 0.7..1.2), except the very smallest of G."""
    torch.manual_seed(0)
    for shape in [(64, 32), (32, 64), (48, 48)]:
        G = torch.randn(*shape)
        s = torch.linalg.svdvals(orthogonalize(G))
        assert s.max() < 1.3 and (s > 0.6).float().mean() > 0.9, (shape, s.min(), s.max())


def test_muon_fits_a_linear_map():
    torch.manual_seed(0)
    target = torch.randn(16, 16)
    layer = nn.Linear(16, 16, bias=False)
    opt = Muon(layer.parameters(), lr=0.1)
    x = torch.randn(256, 16)
    first = None
    for i in range(200):
        opt.param_groups[0]["lr"] = 0.1 * (1 - i / 200)  # fixed-size steps need a decaying lr to settle
        loss = (layer(x) - x @ target.T).pow(2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 * first


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.w = nn.Linear(4, 4, bias=False)
        self.norm = nn.RMSNorm(4)
        self.lm_head = nn.Linear(4, 10, bias=False)


def test_parameter_split():
    model = Toy()
    adamw, muon = build_optimizers(model, TrainConfig(optimizer="muon"), "cpu")
    assert [p for g in muon.param_groups for p in g["params"]] == [model.w.weight]
    adamw_params = {id(p) for g in adamw.param_groups for p in g["params"]}
    assert adamw_params == {id(model.embed.weight), id(model.norm.weight), id(model.lm_head.weight)}
    only = build_optimizers(model, TrainConfig(optimizer="adamw"), "cpu")
    assert len(only) == 1 and sum(len(g["params"]) for g in only[0].param_groups) == 4


def test_wsd_schedule():
    kw = dict(warmup_steps=10, decay_frac=0.4, min_lr_frac=0.1)
    assert lr_multiplier(0, 0.0, **kw) == 0.1
    assert lr_multiplier(9, 0.05, **kw) == 1.0
    assert lr_multiplier(50, 0.5, **kw) == 1.0  # stable
    assert abs(lr_multiplier(80, 0.8, **kw) - 0.55) < 1e-9  # halfway through the decay
    assert abs(lr_multiplier(99, 1.0, **kw) - 0.1) < 1e-9
