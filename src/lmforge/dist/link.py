"""The network between sites: a link model (bandwidth up/down, latency), named presets, the cost of collectives
over it, and a software delay that makes a real torch.distributed collective take as long as the link would.

A link is what one site has to the others: `up_bps` it can send, `down_bps` it can receive, and `latency_s`
charged once per message (the alpha of the usual alpha-beta model; bytes / bandwidth is the beta term). The
presets quote each link's round-trip time as its latency: a step of a collective over TCP is done when the data
is acknowledged, so the round trip is the honest per-step cost, and for the multi-megabyte payloads of training
the bandwidth term dominates anyway. Bytes counted here are payload bytes; TCP/IP headers add about 4% at an
MTU of 1500.

On one machine, `DelayedCollectives` runs the real collective (Gloo on CPU, NCCL on GPU) and then sleeps until
the modelled time has passed, so a run on a laptop reproduces the timing of a satellite link and counts the
bytes each site would have sent.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lmforge.errors import ConfigError

DIRECTIONS = ("up", "down")


@dataclass(frozen=True)
class Link:
    """One site's connection to the others."""

    name: str
    up_bps: float  # bits per second the site can send
    down_bps: float  # bits per second the site can receive
    latency_s: float  # seconds charged per message, on top of its bytes / bandwidth
    source: str = ""  # where the figures come from (presets), or the spec it was parsed from

    def __post_init__(self) -> None:
        if not (self.up_bps > 0 and self.down_bps > 0):
            raise ConfigError(f"link {self.name!r} needs positive bandwidths, got up {self.up_bps} and down "
                              f"{self.down_bps} bit/s")
        if self.latency_s < 0:
            raise ConfigError(f"link {self.name!r} has a negative latency ({self.latency_s} s)")

    @property
    def bottleneck_bps(self) -> float:
        """The slower direction: each hop of a ring both sends and receives, so it runs at this rate."""
        return min(self.up_bps, self.down_bps)

    def transfer_seconds(self, nbytes: float, direction: str = "up") -> float:
        """Time to send ('up') or receive ('down') one message of `nbytes`: latency + bits / bandwidth."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be 'up' or 'down', got {direction!r}")
        bps = self.up_bps if direction == "up" else self.down_bps
        return self.latency_s + 8.0 * nbytes / bps

    def all_reduce_seconds(self, nbytes: float, participants: int) -> float:
        """Ring all-reduce of an `nbytes` tensor among `participants` sites, each on a link like this one.

            T = 2 (P - 1) / P * N / bw  +  2 (P - 1) * latency

        The ring runs P - 1 reduce-scatter steps then P - 1 all-gather steps; in each, every site sends one
        chunk of N / P bytes to its neighbour and receives one, so bw is the slower of up and down. Ring is
        bandwidth-optimal, which is what matters on slow links; one site costs nothing.
        """
        p = check_participants(participants)
        return all_reduce_bytes_sent(nbytes, p) * 8.0 / self.bottleneck_bps + 2 * (p - 1) * self.latency_s

    def all_gather_seconds(self, nbytes: float, participants: int) -> float:
        """Ring all-gather where each of `participants` sites contributes `nbytes` (every site ends with P * N):

            T = (P - 1) * N / bw  +  (P - 1) * latency

        The same cost as a reduce-scatter of a P * N tensor: half of an all-reduce's ring.
        """
        p = check_participants(participants)
        return (p - 1) * nbytes * 8.0 / self.bottleneck_bps + (p - 1) * self.latency_s

    def describe(self) -> str:
        """e.g. 'starlink: 15 Mbit/s up, 100 Mbit/s down, 40 ms'."""
        if self.up_bps == self.down_bps:
            rates = f"{bits(self.up_bps)} each way"
        else:
            rates = f"{bits(self.up_bps)} up, {bits(self.down_bps)} down"
        return f"{self.name}: {rates}, {seconds_text(self.latency_s)}"


def check_participants(participants: int) -> int:
    if not isinstance(participants, int) or participants < 1:
        raise ValueError(f"participants must be a positive integer, got {participants!r}")
    return participants


def all_reduce_bytes_sent(nbytes: float, participants: int) -> float:
    """Bytes each site sends in a ring all-reduce of `nbytes`: 2 (P - 1) / P * N (and receives as many)."""
    p = check_participants(participants)
    return 2.0 * (p - 1) / p * nbytes


PRESETS: dict[str, Link] = {link.name: link for link in (
    Link("datacenter", 400e9, 400e9, 10e-6,
         "one 400 Gb/s InfiniBand NDR / 400GbE port per GPU, about 10 us through NIC and switch"),
    Link("cross-region", 10e9, 10e9, 40e-3,
         "a 10 Gb/s dedicated interconnect between cloud regions; 40 ms is the round trip over ~4000 km of fibre "
         "(light in glass: 5 us/km each way)"),
    Link("starlink", 15e6, 100e6, 40e-3,
         "Starlink's published residential figures: 25-220 Mb/s down, 5-20 Mb/s up, 25-60 ms latency "
         "(starlink.com/specifications); typical values taken"),
    Link("geo-satellite", 50e6, 50e6, 600e-3,
         "a geostationary satellite at 35,786 km: ground-satellite-ground and back is ~480 ms at light speed, "
         "~600 ms round trip with processing, as Viasat and HughesNet users measure"),
    Link("laser-isl", 100e9, 100e9, 5e-3,
         "optical inter-satellite links of ~100 Gb/s (SpaceX's figure for Starlink's lasers); 5 ms is light over "
         "~1500 km of vacuum, a few neighbouring LEO hops"),
)}

SPEC_FORMS = ("a preset (" + ", ".join(PRESETS) + ") or 'up=RATE,down=RATE,latency=TIME' / 'bw=RATE,latency=TIME' "
              "with RATE like 20Mbit, 1.5Gbit, 800kbit (per second) and TIME like 40ms, 0.6s, 10us")
RATE_UNITS = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9}
TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6}
RATE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(?:e([+-]?\d+))?\s*([kmg]?)(?:bit(?:/s|ps)?|bps)", re.IGNORECASE)
TIME = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(?:e([+-]?\d+))?\s*(s|ms|us|µs)", re.IGNORECASE)


def parse_link(spec: str) -> Link:
    """A preset name, or a custom spec like 'up=20Mbit,down=100Mbit,latency=40ms' (see SPEC_FORMS)."""
    text = spec.strip()
    if text.lower() in PRESETS:
        return PRESETS[text.lower()]
    if "=" not in text:
        raise ConfigError(f"unknown link {spec!r}; use {SPEC_FORMS}")
    values: dict[str, float] = {}
    for part in text.split(","):
        key, sep, raw = (s.strip() for s in part.partition("="))
        key = key.lower()
        if not sep or key not in ("up", "down", "bw", "latency"):
            raise ConfigError(f"bad part {part.strip()!r} in link spec {spec!r}; use {SPEC_FORMS}")
        if key in values:
            raise ConfigError(f"{key!r} is given twice in link spec {spec!r}; use {SPEC_FORMS}")
        pattern, units = (TIME, TIME_UNITS) if key == "latency" else (RATE, RATE_UNITS)
        match = pattern.fullmatch(raw)
        if match is None:
            bytes_hint = " (rates are in bits: write Mbit, not MB)" if re.search(r"[kmg]?B(/s|ps)?$", raw) else ""
            raise ConfigError(f"bad value {raw!r} for {key} in link spec {spec!r}{bytes_hint}; use {SPEC_FORMS}")
        number, exponent, unit = match.groups()
        values[key] = float(number) * 10.0 ** int(exponent or 0) * units[unit.lower()]
    if "bw" in values and ("up" in values or "down" in values):
        raise ConfigError(f"link spec {spec!r} gives bw with up/down; give bw (both ways) or up and down")
    up, down = values.get("up", values.get("bw")), values.get("down", values.get("bw"))
    missing = [name for name, v in (("up", up), ("down", down), ("latency", values.get("latency"))) if v is None]
    if missing:
        raise ConfigError(f"link spec {spec!r} lacks {' and '.join(missing)}; use {SPEC_FORMS}")
    if up == 0 or down == 0:
        raise ConfigError(f"link spec {spec!r} has a zero bandwidth; give a positive RATE")
    return Link("custom", up, down, values["latency"], source=text)


def bits(bps: float) -> str:
    """400e9 -> '400 Gbit/s'."""
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if bps >= scale:
            return f"{bps / scale:g} {prefix}bit/s"
    return f"{bps:g} bit/s"


def seconds_text(s: float) -> str:
    """0.04 -> '40 ms', 1e-5 -> '10 us' (three significant digits)."""
    if s == 0 or s >= 1:
        return f"{s:.3g} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} us"


@dataclass
class CommStats:
    """What one rank spent on delayed collectives."""

    calls: int = 0
    bytes_sent: float = 0.0  # payload bytes this rank sent, per the ring model
    seconds: float = 0.0  # from issue to completion as the link allows: max(modelled, real transport)
    waited_seconds: float = 0.0  # time the caller blocked in wait(); less than `seconds` when work overlapped
    modelled_seconds: float = 0.0  # what the link model charged
    transport_seconds: float = 0.0  # what the real transport took (seen from wait(), so an upper bound)


class DelayedWork:
    """A collective in flight; wait() returns no sooner than the link model allows."""

    def __init__(self, work: dist.Work, stats: CommStats, modelled: float, nbytes_sent: float) -> None:
        self.work, self.stats, self.modelled, self.nbytes_sent = work, stats, modelled, nbytes_sent
        self.issued = time.perf_counter()
        self.done = False

    def wait(self) -> None:
        if self.done:
            return
        entered = time.perf_counter()
        self.work.wait()
        transport = time.perf_counter() - self.issued
        time.sleep(max(0.0, self.modelled - transport))  # pad the real collective out to the link's time
        finished = time.perf_counter()
        s = self.stats
        s.calls += 1
        s.bytes_sent += self.nbytes_sent
        s.seconds += finished - self.issued
        s.waited_seconds += finished - entered
        s.modelled_seconds += self.modelled
        s.transport_seconds += transport
        self.done = True


class DelayedCollectives:
    """torch.distributed collectives over `group`, each taking at least as long as `link` would take.

    Every rank in the group is one site on its own `link`. The real collective runs first; then the caller
    sleeps for max(0, modelled - measured), so the wall time matches the model whenever the real transport is
    faster than the simulated link (on one machine it always is, except for datacenter-class links).
    """

    def __init__(self, link: Link, group: dist.ProcessGroup | None = None) -> None:
        self.link, self.group = link, group
        self.stats = CommStats()

    def all_reduce(self, tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM,
                   async_op: bool = False) -> DelayedWork | None:
        """dist.all_reduce of `tensor` in place; with async_op, returns a handle whose wait() completes it."""
        participants = dist.get_world_size(self.group)
        nbytes = tensor.numel() * tensor.element_size()
        modelled = self.link.all_reduce_seconds(nbytes, participants)
        work = DelayedWork(dist.all_reduce(tensor, op=op, group=self.group, async_op=True), self.stats, modelled,
                           all_reduce_bytes_sent(nbytes, participants))
        if async_op:
            return work
        work.wait()
        return None

    def all_gather(self, tensors: list[torch.Tensor], tensor: torch.Tensor,
                   async_op: bool = False) -> DelayedWork | None:
        """dist.all_gather of every rank's `tensor` into `tensors` (one per rank, in rank order)."""
        participants = dist.get_world_size(self.group)
        nbytes = tensor.numel() * tensor.element_size()
        modelled = self.link.all_gather_seconds(nbytes, participants)
        work = DelayedWork(dist.all_gather(tensors, tensor, group=self.group, async_op=True), self.stats, modelled,
                           (participants - 1) * nbytes)
        if async_op:
            return work
        work.wait()
        return None

    def broadcast(self, tensor: torch.Tensor, group_src: int) -> None:
        """dist.broadcast of `tensor` from the group's rank `group_src`, charged as a ring all-gather in which only
        that rank has something to send (a pipelined ring passes it on in as many steps)."""
        participants = dist.get_world_size(self.group)
        nbytes = tensor.numel() * tensor.element_size()
        modelled = self.link.all_gather_seconds(nbytes, participants)
        rank = self.group.rank() if self.group is not None else dist.get_rank()
        sent = nbytes if rank != (group_src - 1) % participants else 0  # every rank but the last hop sends it on
        DelayedWork(dist.broadcast(tensor, group=self.group, group_src=group_src, async_op=True), self.stats,
                    modelled, sent).wait()
