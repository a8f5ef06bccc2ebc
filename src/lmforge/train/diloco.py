"""DiLoCo: sites that train on their own and meet every H steps, for links too slow to all-reduce every step.

Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language Models" (2023). The ranks of a run
are split into K sites of M ranks (site s = ranks s*M .. s*M+M-1); inside a site the ranks are ordinary data
parallel (DDP over the site's group). Every site starts from the same global weights θ and takes H steps with its
own inner optimizer (whose state it keeps). Then the outer step, the same on every rank:

    Δ_s = θ - θ_s                       the site's pseudo-gradient (fp32)
    Δ   = mean over sites of Δ_s        sent in the wire precision (fp32, bf16, int8 + a scale per 256 values,
                                        or NF4 + a scale per 128 values), summed in fp32 in site order, so every
                                        rank gets bit-identical Δ
    b   = μ b + Δ;  θ -= lr (Δ + μ b)   Nesterov SGD (outer lr 0.7, μ 0.9 as in the paper)

and every site continues from the new θ. With --sites.sync_by lr, the exchanges follow the learning rate instead:
one after every H steps' worth of it, so H steps apart at the peak and farther apart in warm-up and decay
(SyncClock in train/schedule.py). Only rank j of each site talks to rank j of the others (one cross-site
group per j), and each such transfer is delayed to what the configured link would take (DelayedCollectives in
dist/link.py), so a run on one machine shows the wall time of the real link. The bytes each rank sends and the
seconds it spends in the outer exchange are counted for the ledger.

Fault tolerance (--sites.drop_after S > 0): each site is its own job, and dist/quorum.py decides, exchange by
exchange, which sites take part: a site silent for S seconds is dropped from the exchange and the others go on
with the mean over those present. Every member first tells the others how many exchanges its θ has seen and a
hash of it; the member with the most (the first of them on a tie) leads, and every member whose θ differs from
the leader's (a restarted site, a site that came too late to the last exchange) contributes nothing and receives
the leader's θ, outer momentum and step instead: that is how a site rejoins. Plain DiLoCo only (one fragment, no
overlap).

A checkpoint holds the global weights: where it does not fall on an exchange of the whole model (streaming,
overlap, sync_by lr), the fragments not exchanged at its step are exchanged first. It keeps θ, the outer momentum,
the sync clock, site 0's weights and site 0's inner optimizer state, which every site resumes from; only the other
sites' inner optimizer states are lost.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import parameters_to_vector

from lmforge.config import SitesConfig
from lmforge.dist.link import DelayedCollectives, parse_link
from lmforge.dist.plan import INT8_BLOCK, NF4_BLOCK
from lmforge.dist.quorum import Members, Quorum
from lmforge.errors import ConfigError, LmforgeError
from lmforge.train.parallel import World
from lmforge.train.schedule import SyncClock


@dataclass
class OuterStats:
    bytes_sent: int  # by this rank, for this outer step
    waited: float  # seconds training stood still for it (less than `seconds` when it overlapped with steps)
    seconds: float  # from sending to the outer update, including the link's modelled time
    replica_spread: float  # max - min over ranks of a hash of θ: 0 when every rank holds the same θ
    # fault-tolerant runs only:
    step: int = -1  # the step this exchange belongs to (a site that caught up continues from it)
    sites: tuple[int, ...] = ()  # the sites that took part
    caught_up: tuple[int, ...] = ()  # the sites among them that took θ from the others instead of contributing
    work: dict[int, tuple[float, float]] = field(default_factory=dict)  # site -> (tokens, joules) it reported


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


# NF4 (Dettmers et al., QLoRA 2023): the 16 quantiles of a normal distribution scaled to [-1, 1], zero included;
# on the near-normal values of a pseudo-gradient block their squared rounding error is a third to a half below that
# of 16 evenly spaced levels (tests/test_train_parallel.py)
NF4_LEVELS = torch.tensor([-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
                           0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0])
NF4_BOUNDS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2  # a value goes to the level whose interval holds it


def encode(delta: torch.Tensor, wire: str) -> list[torch.Tensor]:
    """The pseudo-gradient (N,) as it goes on the wire: each block scaled by its largest magnitude, then rounded
    to the nearest integer (int8) or NF4 level (nf4, two 4-bit codes per byte)."""
    if wire == "bf16":
        return [delta.to(torch.bfloat16)]
    if wire in ("int8", "nf4"):
        block = INT8_BLOCK if wire == "int8" else NF4_BLOCK
        blocks = torch.nn.functional.pad(delta, (0, -delta.numel() % block)).view(-1, block)  # (N/block, block)
        scales = blocks.abs().amax(dim=1).clamp_min(1e-30)  # (N/block,)
        if wire == "int8":
            scales = scales / 127
            return [(blocks / scales[:, None]).round().clamp(-127, 127).to(torch.int8), scales]
        codes = torch.bucketize(blocks / scales[:, None], NF4_BOUNDS.to(delta.device)).to(torch.uint8).view(-1, 2)
        return [codes[:, 0] | (codes[:, 1] << 4), scales]
    return [delta]


def decode(parts: list[torch.Tensor], wire: str, n: int) -> torch.Tensor:
    """A received pseudo-gradient back in fp32, (N,)."""
    if wire == "int8":
        q, scales = parts
        return (q.float() * scales[:, None]).view(-1)[:n]
    if wire == "nf4":
        packed, scales = parts
        codes = torch.stack([packed & 15, packed >> 4], dim=1).long()  # (N/2, 2)
        values = NF4_LEVELS.to(scales.device)[codes].view(scales.numel(), -1)  # (N/block, block)
        return (values * scales[:, None]).view(-1)[:n]
    return parts[0].float()


@dataclass
class Exchange:
    """One fragment's pseudo-gradient on its way: started at `step`, finished `overlap` steps later."""
    fragment: int
    step: int
    works: list  # DelayedWork handles
    received: list  # fp32: [the all-reduced delta]; else per wire part, one tensor per site
    local: torch.Tensor  # the fragment's local weights when it was sent (to keep the progress made since)
    started: float
    sent_bytes: float


class DiLoCo:
    """The outer loop of one rank: holds θ and the outer momentum; `after_step(step)` after every inner step.

    Streaming (`fragments` F > 1): the parameters are cut into F fragments of about equal size, and fragment f is
    exchanged at steps s with s % H == f * H // F (by steps; by lr, the same offsets in summed learning rate), so
    each exchange carries 1/F of the model and the link is busy more evenly. Overlap (`overlap_steps` τ > 0): an
    exchange is started, the site keeps training, and only τ steps later is the outer step applied, keeping the
    progress the site made meanwhile: θ_site ← θ_new + (θ_site_now - θ_site_when_sent). With τ = 0 and F = 1 this
    is plain DiLoCo.
    """

    def __init__(self, model: nn.Module, cfg: SitesConfig, world: World, cross_group: object,
                 quorum: Quorum | None = None):
        self.cfg, self.world = cfg, world
        # each exchange takes as long as the link would (the real transfer, then a sleep for the rest)
        self.link = parse_link(cfg.link)
        self.comm = DelayedCollectives(self.link, cross_group)
        self.sites = cfg.count
        self.params = list(model.parameters())
        self.theta = parameters_to_vector(self.params).detach().clone().float()  # (N,) the global weights
        self.momentum = torch.zeros_like(self.theta)
        self.fragments = fragment_bounds([p.numel() for p in self.params], cfg.fragments)  # [(start, end)] in θ
        self.clock = SyncClock(cfg.sync_every, len(self.fragments), cfg.sync_by)
        self.exchanged_at = [0] * len(self.fragments)  # the step each fragment was last sent at
        self.pending: list[Exchange] = []
        # fault-tolerant runs: the membership, exchanges this θ has seen, whether this site must catch up first
        self.quorum, self.seen, self.behind = quorum, 0, False
        # how long a member of an exchange waits for the others inside it before it gives up on them
        self.group_timeout_s = cfg.drop_after + 2 * self.link.all_reduce_seconds(4 * self.theta.numel(), 2) + 10

    def after_step(self, step: int, work: tuple[float, float] = (0.0, 0.0), lr_mult: float = 1.0) -> list[OuterStats]:
        """Finish the exchanges due at this step, then start the ones due; the outer steps completed now.
        `work`: this site's (tokens, joules) so far, which a fault-tolerant exchange passes on to site 0;
        `lr_mult`: the step's learning-rate multiplier, which the clock counts with sync_by lr."""
        due = self.clock.due(step, lr_mult)
        if self.quorum is not None:
            return [self._exchange(step, work)] if due else []
        done = [self._finish(e) for e in self.pending if step - e.step >= self.cfg.overlap_steps]
        self.pending = [e for e in self.pending if step - e.step < self.cfg.overlap_steps]
        self.pending += [self._start(f, step) for f in due]
        if self.cfg.overlap_steps == 0:
            done += [self._finish(e) for e in self.pending]
            self.pending = []
        return done

    def in_sync(self, step: int) -> bool:
        """Whether every site holds θ after this step: nothing in flight, every fragment exchanged at it."""
        return not self.pending and all(at == step for at in self.exchanged_at)

    def sync_all(self, step: int, work: tuple[float, float] = (0.0, 0.0)) -> list[OuterStats]:
        """Finish every exchange in flight, then exchange every fragment not exchanged at this step (blocking):
        every site then holds θ. Before a checkpoint and at the end of a run, so what is saved is the global model."""
        if self.quorum is not None:
            return [self._exchange(step, work)]
        done = [self._finish(e) for e in self.pending]
        self.pending = []
        behind = [f for f, at in enumerate(self.exchanged_at) if at != step]
        return done + [self._finish(self._start(f, step)) for f in behind]

    def _slices(self, start: int, end: int):
        """For each parameter overlapping θ[start:end]: its flat view, the overlap in it, the overlap in the range."""
        offset = 0
        for p in self.params:
            lo, hi = max(start, offset), min(end, offset + p.numel())
            if lo < hi:
                yield p.data.view(-1), slice(lo - offset, hi - offset), slice(lo - start, hi - start)
            offset += p.numel()

    def _flat(self, start: int, end: int) -> torch.Tensor:
        """The site's weights θ_s[start:end] in fp32 (only the parameters in that range are read)."""
        return torch.cat([flat[own].float() for flat, own, _ in self._slices(start, end)])

    def _start(self, f: int, step: int) -> Exchange:
        start, end = self.fragments[f]
        self.exchanged_at[f] = step
        local = self._flat(start, end)  # (n,)
        delta = self.theta[start:end] - local  # the pseudo-gradient Δ_s of this fragment
        sent = self.comm.stats.bytes_sent
        if self.cfg.wire == "fp32":  # summed by the all-reduce itself, in fp32
            works, received = [self.comm.all_reduce(delta, async_op=True)], [delta]
        else:  # gathered, then summed in fp32 in site order: low-precision values are never added to each other
            works, received = [], []
            for part in encode(delta, self.cfg.wire):
                pieces = [torch.empty_like(part) for _ in range(self.sites)]
                works.append(self.comm.all_gather(pieces, part, async_op=True))
                received.append(pieces)
        return Exchange(f, step, works, received, local, time.perf_counter(), self.comm.stats.bytes_sent - sent)

    def _finish(self, e: Exchange) -> OuterStats:
        waited = time.perf_counter()
        sent_before = self.comm.stats.bytes_sent
        for work in e.works:
            work.wait()
        waited = time.perf_counter() - waited
        start, end = self.fragments[e.fragment]
        if self.cfg.wire == "fp32":
            total = e.received[0]
        else:
            total = torch.zeros(end - start, device=self.theta.device)
            for site in range(self.sites):
                total += decode([pieces[site] for pieces in e.received], self.cfg.wire, end - start)
        mean = total / self.sites
        # Nesterov SGD on θ with the mean pseudo-gradient as its gradient (torch.optim.SGD's arithmetic)
        theta, momentum = self.theta[start:end], self.momentum[start:end]
        momentum.mul_(self.cfg.outer_momentum).add_(mean)
        theta.sub_(self.cfg.outer_lr * (mean + self.cfg.outer_momentum * momentum))
        site = theta + (self._flat(start, end) - e.local)  # θ_new plus what the site learned since sending
        for flat, own, part in self._slices(start, end):  # copied in: parameters never share θ's memory
            flat[own].copy_(site[part])
        digest = theta_digest(self.theta)
        high, low = self.world.largest([digest, -digest])
        bytes_sent = e.sent_bytes + self.comm.stats.bytes_sent - sent_before
        return OuterStats(int(bytes_sent), waited, time.perf_counter() - e.started, high + low)

    def catch_up(self) -> OuterStats:
        """A restarted site: wait for the next exchange and take θ, the outer momentum and the step from it."""
        self.behind = True
        return self._exchange(0, (0.0, 0.0))

    def _exchange(self, step: int, work: tuple[float, float]) -> OuterStats:
        """One outer step among the sites that turn up (fault-tolerant runs), tried until it goes through."""
        started = time.perf_counter()
        exchange, attempt = -(-step // self.cfg.sync_every), 0  # numbered by step: the same on every site
        if self.behind:
            exchange = self.quorum.latest() + 1
        while True:
            members = self._agree(exchange, attempt)
            if members.index < 0:  # came after the members were fixed: catch up at the next exchange
                self.behind = True
                exchange, attempt = max(exchange, self.quorum.latest()) + 1, 0
                continue
            try:
                outcome, error = self._exchange_among(members, step, work), None
            except RuntimeError as e:  # a member died or stalled inside the exchange
                outcome, error = None, e
            # every rank of this site commits, or every rank tries again (each talks to its peers in its own group)
            if self.world.largest([0.0 if outcome else 1.0])[0]:
                attempt += 1
                if attempt > 2 * self.sites:  # more failures than dead sites can explain
                    raise LmforgeError(f"DiLoCo exchange {exchange} failed {attempt} times"
                                       + (f"; the last error: {str(error).splitlines()[0]}" if error else ""))
                continue
            self.theta, self.momentum, self.seen, stats = outcome
            self.behind, self.exchanged_at = False, [stats.step]  # the leader's step, which a late site takes
            for flat, own, part in self._slices(0, self.theta.numel()):
                flat[own].copy_(self.theta[part])
            if self.world.local_rank == 0:
                self.quorum.completed(exchange)
            stats.seconds = stats.waited = time.perf_counter() - started
            return stats

    def _agree(self, exchange: int, attempt: int) -> Members:
        """The members of this attempt, fixed by the site's first rank and passed to the site's other ranks."""
        members = [self.quorum.agree(exchange, attempt, joining=self.behind) if self.world.local_rank == 0 else None]
        if self.world.distributed:
            dist.broadcast_object_list(members, src=self.world.rank - self.world.local_rank)
        return members[0]

    def _exchange_among(self, members: Members, step: int,
                        work: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor, int, OuterStats]:
        """One attempt: the new θ, momentum and exchange count, not yet committed (the caller does that)."""
        group = self.quorum.group(members, self.world.local_rank, self.group_timeout_s)
        comm = DelayedCollectives(self.link, group)
        n, size = len(members.sites), self.theta.numel()
        # 1. who holds the current θ: the member whose θ has seen the most exchanges (the first on a tie) leads;
        #    whoever holds a different θ (restarted, or left out last time) takes the leader's instead
        mine = torch.tensor([-1.0 if self.behind else float(self.seen), theta_digest(self.theta), float(step),
                             *work, float(size)], dtype=torch.float64)
        metas = [torch.empty_like(mine) for _ in range(n)]
        comm.all_gather(metas, mine)
        for site, meta in zip(members.sites, metas):
            if int(meta[5]) != size:  # not a fault to retry: the sites were started with different models
                raise ConfigError(f"site {site} trains a model of {int(meta[5]):,} parameters and site "
                                  f"{self.quorum.site} one of {size:,}; give every site the same config")
        leader = max(range(n), key=lambda i: (metas[i][0].item(), -i))
        contributors = [i for i in range(n) if metas[i][:2].tolist() == metas[leader][:2].tolist()]
        # 2. the mean pseudo-gradient over the contributors, as in `_start` / `_finish`
        delta = self.theta - self._flat(0, size) if members.index in contributors else torch.zeros_like(self.theta)
        if self.cfg.wire == "fp32":
            comm.all_reduce(delta)
            total = delta
        else:
            received = []
            for part in encode(delta, self.cfg.wire):
                pieces = [torch.empty_like(part) for _ in range(n)]
                comm.all_gather(pieces, part)
                received.append(pieces)
            total = torch.zeros_like(self.theta)
            for i in contributors:
                total += decode([pieces[i] for pieces in received], self.cfg.wire, size)
        mean = total / len(contributors)
        # the new θ and momentum are kept aside: an attempt that fails leaves this site as it was, to try again
        momentum = self.momentum * self.cfg.outer_momentum + mean
        theta = self.theta - self.cfg.outer_lr * (mean + self.cfg.outer_momentum * momentum)
        # 3. the leader's θ and momentum to those catching up
        if len(contributors) < n:
            state = torch.cat([theta, momentum])  # (2N,)
            comm.broadcast(state, group_src=leader)
            theta, momentum = state[:size], state[size:]
        digest = theta_digest(theta)
        digests = torch.tensor([digest, -digest], dtype=torch.float64)
        dist.all_reduce(digests, op=dist.ReduceOp.MAX, group=group)
        stats = OuterStats(int(comm.stats.bytes_sent), 0.0, 0.0, float(digests.sum()), step=int(metas[leader][2]),
                           sites=members.sites,
                           caught_up=tuple(members.sites[i] for i in range(n) if i not in contributors),
                           work={members.sites[i]: (float(metas[i][3]), float(metas[i][4])) for i in range(n)})
        return theta, momentum, int(metas[leader][0]) + 1, stats

    def state_dict(self) -> dict:
        return {"theta": self.theta.clone(), "momentum": self.momentum.clone(), "clock": self.clock.state_dict()}

    def load_state_dict(self, state: dict, step: int) -> None:
        """Resume at `step`, where the checkpoint left every site holding θ."""
        self.theta = state["theta"].to(self.theta.device)
        self.momentum = state["momentum"].to(self.theta.device)
        if "clock" in state:  # (checkpoints before sync_by have none: their clock counted steps, which needs none)
            self.clock.load_state_dict(state["clock"])
        self.exchanged_at = [step] * len(self.fragments)


def theta_digest(theta: torch.Tensor) -> float:
    """48 bits of a hash of θ's bytes (exact in a float64): equal on two ranks iff they hold the same θ."""
    return float(int.from_bytes(hashlib.blake2b(theta.cpu().numpy().tobytes(), digest_size=6).digest(), "big"))


def fragment_bounds(sizes: list[int], fragments: int) -> list[tuple[int, int]]:
    """Cut a flat vector of parameters with these sizes into `fragments` runs of whole parameters, of about equal
    size: [(start, end)] offsets into it."""
    total = sum(sizes)
    if fragments > len(sizes):
        raise ConfigError(f"--sites.fragments {fragments} exceeds the model's {len(sizes)} parameter tensors; "
                          f"use at most that many")
    bounds, start, offset = [], 0, 0
    for i, size in enumerate(sizes):
        offset += size
        remaining_params, remaining_fragments = len(sizes) - i - 1, fragments - len(bounds) - 1
        if remaining_fragments and (offset >= total * (len(bounds) + 1) / fragments
                                    or remaining_params == remaining_fragments):
            bounds.append((start, offset))
            start = offset
    bounds.append((start, total))
    return bounds
