"""DiLoCo: sites that train on their own and meet every H steps, for links too slow to all-reduce every step.

Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language Models" (2023). The ranks of a run
are split into K sites of M ranks (site s = ranks s*M .. s*M+M-1); inside a site the ranks are ordinary data
parallel (DDP over the site's group). Every site starts from the same global weights θ and takes H steps with its
own inner optimizer (whose state it keeps). Then the outer step, the same on every rank:

    Δ_s = θ - θ_s                       the site's pseudo-gradient (fp32)
    Δ   = mean over sites of Δ_s        sent in the wire precision (fp32, bf16, or int8 + a scale per 256 values),
                                        summed in fp32 in site order, so every rank gets bit-identical Δ
    b   = μ b + Δ;  θ -= lr (Δ + μ b)   Nesterov SGD (outer lr 0.7, μ 0.9 as in the paper)

and every site continues from the new θ. Only rank j of each site talks to rank j of the others (one cross-site
group per j), and each such transfer is delayed to what the configured link would take (dist/link.py), so a run on
one machine shows the wall time of the real link. The bytes each rank sends and the seconds it spends in the outer
exchange are counted for the ledger.

Checkpoints are taken right after an outer step (checkpoint_every must be a multiple of H), when every site holds
θ; they keep θ, the outer momentum and site 0's inner optimizer state, which every site resumes from.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import parameters_to_vector

from lmforge.config import SitesConfig
from lmforge.dist.link import Link, parse_link
from lmforge.errors import ConfigError
from lmforge.train.parallel import World

INT8_BLOCK = 256  # values sharing one fp32 scale on an int8 wire


@dataclass
class OuterStats:
    bytes_sent: int  # by this rank, for this outer step
    seconds: float  # in the exchange, including the link's modelled delay
    replica_spread: float  # max - min over ranks of a hash of θ: 0 when every replica is identical


def site_groups(world: World, count: int) -> tuple[int, object, object]:
    """This rank's site, its site's group (None when a site is one rank) and its cross-site group.

    Every rank creates every group, in the same order, as torch.distributed requires."""
    if world.world_size % count:
        raise ConfigError(f"--sites.count {count} does not divide the {world.world_size} processes; start a multiple "
                          f"of {count} (--nproc, torchrun --nproc-per-node)")
    per_site = world.world_size // count
    site, index = divmod(world.rank, per_site)
    site_group = cross_group = None
    for s in range(count):
        group = dist.new_group(list(range(s * per_site, (s + 1) * per_site))) if per_site > 1 else None
        if s == site:
            site_group = group
    for j in range(per_site):
        group = dist.new_group([s * per_site + j for s in range(count)]) if per_site > 1 else None
        if j == index:
            cross_group = group
    return site, site_group, cross_group


def encode(delta: torch.Tensor, wire: str) -> list[torch.Tensor]:
    """The pseudo-gradient (N,) as it goes on the wire."""
    if wire == "bf16":
        return [delta.to(torch.bfloat16)]
    if wire == "int8":
        n = delta.numel()
        blocks = torch.nn.functional.pad(delta, (0, -n % INT8_BLOCK)).view(-1, INT8_BLOCK)  # (N/256, 256)
        scales = blocks.abs().amax(dim=1).clamp_min(1e-30) / 127  # (N/256,)
        return [(blocks / scales[:, None]).round().clamp(-127, 127).to(torch.int8), scales]
    return [delta]


def decode(parts: list[torch.Tensor], wire: str, n: int) -> torch.Tensor:
    """A received pseudo-gradient back in fp32, (N,)."""
    if wire == "int8":
        q, scales = parts
        return (q.float() * scales[:, None]).view(-1)[:n]
    return parts[0].float()


class DiLoCo:
    """The outer loop of one rank: holds θ and the outer momentum; `outer_step()` after every H inner steps."""

    def __init__(self, model: nn.Module, cfg: SitesConfig, world: World, cross_group: object):
        self.model, self.cfg, self.world, self.group = model, cfg, world, cross_group
        self.link: Link = parse_link(cfg.link)
        self.sites = cfg.count
        self.params = [p for p in model.parameters()]
        self.theta = parameters_to_vector(self.params).detach().clone().float()  # (N,) the global weights
        self.momentum = torch.zeros_like(self.theta)

    def outer_step(self) -> OuterStats:
        start = time.perf_counter()
        n = self.theta.numel()
        delta = self.theta - parameters_to_vector(self.params).detach().float()  # (N,)
        wire = self.cfg.wire
        if wire == "fp32":  # summed by the all-reduce itself, in fp32
            dist.all_reduce(delta, group=self.group)
            total, payload = delta, delta.numel() * 4
            sent = 2 * (self.sites - 1) * payload // self.sites  # ring all-reduce: each rank sends 2(K-1)/K of it
            modelled = self.link.all_reduce_seconds(payload, self.sites)
        else:  # gathered, then summed in fp32 in site order: low-precision values are never added to each other
            parts = encode(delta, wire)
            gathered = []
            for part in parts:
                pieces = [torch.empty_like(part) for _ in range(self.sites)]
                dist.all_gather(pieces, part, group=self.group)
                gathered.append(pieces)
            total = torch.zeros_like(delta)
            for site in range(self.sites):
                total += decode([pieces[site] for pieces in gathered], wire, n)
            payload = sum(p.numel() * p.element_size() for p in parts)
            sent = (self.sites - 1) * payload  # ring all-gather: each rank passes on every other site's payload
            modelled = self.link.all_gather_seconds(payload, self.sites)
        mean = total / self.sites
        # Nesterov SGD on θ with the mean pseudo-gradient as its gradient (torch.optim.SGD's arithmetic)
        self.momentum.mul_(self.cfg.outer_momentum).add_(mean)
        self.theta.sub_(self.cfg.outer_lr * (mean + self.cfg.outer_momentum * self.momentum))
        offset = 0
        for p in self.params:  # copied in: the parameters must never share θ's memory
            p.data.copy_(self.theta[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        # the link: what is left of its modelled time after the real transfer
        time.sleep(max(0.0, modelled - (time.perf_counter() - start)))
        # 48 bits of a hash of θ's bytes (exact in a float64): equal on every rank iff the replicas are identical
        digest = int.from_bytes(hashlib.blake2b(self.theta.cpu().numpy().tobytes(), digest_size=6).digest(), "big")
        high, low = self.world.largest([float(digest), -float(digest)])
        return OuterStats(sent, time.perf_counter() - start, high + low)

    def state_dict(self) -> dict:
        return {"momentum": self.momentum.clone()}

    def load_state_dict(self, state: dict) -> None:
        """After the model's weights are loaded (they are θ: checkpoints follow an outer step)."""
        self.theta = parameters_to_vector(self.params).detach().clone().float()
        self.momentum = state["momentum"].to(self.theta.device)
