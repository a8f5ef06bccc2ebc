"""The server's Prometheus metrics, in one registry per server (so tests can run several in one process).

The engine observes tokens, latencies, queue depth, running sequences, energy and guard verdicts; the HTTP layer
counts requests by route and status. `GET /metrics` renders `ServeMetrics.render()` in the Prometheus text format.
When the engine runs in a process of its own, each process keeps a ServeMetrics and the HTTP process's renders
the two added together (`remote`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import Metric

from lmforge.errors import LmforgeError

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServeMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("lmforge_requests", "HTTP requests answered, by route and status code",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("lmforge_prompt_tokens", "Prompt tokens processed (prefill)", registry=r)
        self.completion_tokens = Counter("lmforge_completion_tokens", "Tokens generated", registry=r)
        self.queue_depth = Gauge("lmforge_queue_depth", "Requests waiting for a free sequence slot", registry=r)
        self.running = Gauge("lmforge_running_sequences", "Sequences in the running batch", registry=r)
        self.slots = Gauge("lmforge_sequence_slots", "Sequence slots (KV-cache rows) in the pool", registry=r)
        self.ttft = Histogram("lmforge_time_to_first_token_seconds", "From arrival to the first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("lmforge_inter_token_latency_seconds", "Between consecutive tokens of one sequence",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("lmforge_request_latency_seconds", "From arrival to the last token",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.speculated = Counter("lmforge_speculated_tokens", "Tokens drafted by speculation (--speculate), and "
                                  "how many of them the model accepted", ["outcome"], registry=r)
        self.flops = Counter("lmforge_flops", "Model FLOPs spent on requests (forward passes)", registry=r)
        self.device_seconds = Counter("lmforge_device_seconds", "Device time spent in forward passes", registry=r)
        self.energy = Counter("lmforge_energy_joules", "Energy of the forward passes; source 'measured' or "
                              "'estimate' (declared power x time)", ["source"], registry=r)
        self.cancelled = Counter("lmforge_cancelled_requests", "Requests cancelled (client gone) before finishing",
                                 registry=r)
        self.rejected = Counter("lmforge_rejected_requests", "Requests refused by backpressure, by reason",
                                ["reason"], registry=r)
        self.guard_checks = Counter("lmforge_guard_checks", "Guard checks (a request's input; a chunk of output), "
                                    "by direction and the action taken", ["direction", "action"], registry=r)
        self.guard_findings = Counter("lmforge_guard_findings", "Guard findings that were not allowed, by direction, "
                                      "hazard category and action", ["direction", "category", "action"], registry=r)
        self.guard_seconds = Histogram("lmforge_guard_seconds", "Time per guard check", ["direction"],
                                       buckets=LATENCY_BUCKETS, registry=r)

        self.remote: Callable[[], list[Metric]] | None = None  # another process's families, added in
        self._remote_last: list[Metric] = []  # its last answer

    def render(self) -> bytes:
        if self.remote is None:
            return generate_latest(self.registry)
        try:
            self._remote_last = self.remote()
        except LmforgeError as e:  # the other process is gone or busy: its last answer stands in (its counters
            log.warning("metrics: %s", e)  # must not seem to go back to zero)
        return generate_latest(Sum(self.registry.collect(), self._remote_last))


class Sum:
    """Two processes' families of the same metrics as one collector: samples added (a `_created` time: the
    earlier). Each side observes its own share, so the sums are the server's totals."""

    def __init__(self, ours: Iterable[Metric], theirs: Iterable[Metric]):
        self.ours, self.theirs = list(ours), {family.name: family for family in theirs}

    def collect(self) -> Iterable[Metric]:
        for family in self.ours:
            other = self.theirs.get(family.name)
            samples = {}
            for s in family.samples + (other.samples if other is not None else []):
                key = (s.name, tuple(sorted(s.labels.items())))
                if key in samples:
                    old = samples[key].value
                    s = s._replace(value=min(old, s.value) if s.name.endswith("_created") else old + s.value)
                samples[key] = s
            merged = Metric(family.name, family.documentation, family.type, family.unit)
            merged.samples = list(samples.values())
            yield merged
