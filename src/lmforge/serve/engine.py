"""The inference engine: continuous batching over a pool of KV-cache rows, per-request sampling, accounting.

No HTTP in here. A caller submits a prompt with its SamplingParams and reads events from the returned handle
(`async for` inside an event loop, or `.result()` from plain code); the engine runs one thread that repeats:

    1. drop cancelled and timed-out requests; admit waiting requests while free rows last (FIFO)
    2. prefill the admitted sequences together (prompts padded to one length) and sample their first tokens
    3. decode one token for every running sequence in one batched forward pass, each row at its own position
       (on CUDA: one replay of a CUDA graph captured for the padded batch size, see DecodeGraphs)
    4. retire finished sequences at once, moving the last row into the hole so running rows stay 0..B-1

A request with n choices runs as n sequences. Greedy output does not depend on what else is in the batch: every
row's arithmetic is the same whatever the other rows hold (the attention mask hides other lengths), which the
tests check against each request run alone.

Accounting: each forward pass's wall time and energy are shared among its sequences by the tokens each fed in;
FLOPs are counted per token at its position. Finished requests go to the ledger's requests table.

Guard rails (optional, `guard=`; guard/rails.py): `prepare` screens a request's text before it is queued, so a
blocked request is answered with the policy's refusal (finish_reason "content_filter") without touching the model,
and a redacted one reaches the model redacted. While generating, each sequence's text passes an output rail
before it is sent: it goes out in checked chunks, redacted where the policy redacts, and a block ends the sequence
with the refusal and finish_reason "content_filter". Verdicts ride on the events (Prefilled.guard for the input,
the last Delta's guard for each choice's output) and every finding is audited in the ledger's guard_events.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import math
import queue
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import torch

from lmforge.checkpoint import LoadedModel, load_model
from lmforge.data.chat import END_OF_TURN, render_chat
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import LmforgeError
from lmforge.guard.guard import Guard, Verdict
from lmforge.guard.rails import OutputRail, audit_rows, screen_input
from lmforge.meter.energy import make_energy_reader
from lmforge.meter.hardware import resolve_profile
from lmforge.meter.ledger import Ledger
from lmforge.model.sampling import sample_next
from lmforge.model.sizing import forward_flops_per_token
from lmforge.model.transformer import KVCache, Transformer
from lmforge.serve.metrics import ServeMetrics
from lmforge.serve.speculation import compiled_propose_and_verify, propose_and_verify
from lmforge.train.runtime import resolve_device

log = logging.getLogger(__name__)


MAX_TEMPERATURE = 2.0  # OpenAI's range
GREEDY_BELOW = 1e-5  # temperatures this small act as greedy (dividing logits by them overflows)
MAX_STOPS, MAX_STOP_CHARS = 16, 256  # keeps the per-token stop-string check cheap
POWER_WINDOW_S = 0.1  # the energy counter is read at most this often
# the shortest cached length a decode graph attends over: below this, attending to padding costs less than the
# memory and capture time of more graphs (longer caches get graphs at double this, double again, ..., the context)
GRAPH_MIN_ATTEND = 256
IDLE_WAIT_S = 0.25  # an idle engine looks for a stop this often
MAX_DECODE_STEPS = 64  # --decode-steps: more only delays admission and cancellation further
MAX_SPECULATE = 16  # --speculate: drafts that long are almost never accepted whole
# --speculate-max-batch auto on a CPU: there a forward of 5 tokens per row costs 1.5x one of 1 at batch 1, and
# 2.5x at batch 8, while drafts add about 1.3 tokens per row and step on the demo model (bench/RESULTS.md). On a
# GPU auto is 0 (no speculation) until a GPU session has measured it: the tenth session's attempt ran out of time
# compiling the speculative step (bench/RESULTS.md)
CPU_SPECULATE_MAX_BATCH = 2


class InvalidRequest(ValueError):
    """The request cannot be served as asked (HTTP 400); the message names the problem and the fix."""


class Overloaded(Exception):
    """The waiting queue is full (HTTP 429); retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class EngineConfig:
    max_concurrency: int = 16  # sequences decoded together (rows of the KV-cache pool)
    max_queue: int = 64  # requests waiting beyond that; more get Overloaded
    queue_timeout: float = 30.0  # seconds a request may wait for a row before it fails
    kv_cache_mb: float = 0.0  # cap on the pool's memory; 0 = max_concurrency full-context rows
    device: str = "auto"
    dtype: str = "auto"  # "auto": bf16 on GPU, fp32 on CPU
    compile: bool = False  # torch.compile the decode step and the prefill (a one-off 10-60 s at start, up to ~90 s
    # with an empty compile cache; ~2x faster steps on CPU); with CUDA graphs, the graphs capture the compiled step
    cuda_graphs: bool = True  # on CUDA, replay the decode step as CUDA graphs (DecodeGraphs); no effect on a CPU
    decode_steps: int = 1  # greedy tokens decoded per scheduler step, fed back on the device (see Engine._decode)
    speculate: int = 0  # tokens drafted per sequence and step by prompt lookup (serve/speculation.py); 0 = off
    speculate_max_batch: int = 0  # speculate while at most this many sequences run; 0 = auto (2 on a CPU, none
    # on a GPU)

    def validate(self) -> None:
        for name in ("max_concurrency", "max_queue"):
            if getattr(self, name) < 1:
                raise LmforgeError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.queue_timeout <= 0 or self.kv_cache_mb < 0:
            raise LmforgeError("--queue-timeout must be > 0 and --kv-cache-mb >= 0")
        if not 1 <= self.decode_steps <= MAX_DECODE_STEPS:
            raise LmforgeError(f"--decode-steps must be between 1 and {MAX_DECODE_STEPS}, got {self.decode_steps}")
        if not 0 <= self.speculate <= MAX_SPECULATE:
            raise LmforgeError(f"--speculate must be between 0 and {MAX_SPECULATE}, got {self.speculate}")
        if self.speculate_max_batch < 0:
            raise LmforgeError(f"--speculate-max-batch must be 0 (auto) or more, got {self.speculate_max_batch}")


def prefill_logits(model: Transformer, idx: torch.Tensor, view: KVCache, start_pos: torch.Tensor,
                   last: torch.Tensor, vocab: int) -> torch.Tensor:
    """The prefill's forward: prompts idx (B, T) from start_pos (B,) into cache rows `view` (staged, not written);
    the float logits (B, vocab) at positions last (B,). A function of its own, so that compiled it has its own
    versions."""
    return model(idx, kv_cache=view, start_pos=start_pos, logits_at=last)[:, 0, :vocab].float()


def sequence_rows(model: Transformer, rows: int, device: torch.device, dtype: torch.dtype) -> KVCache:
    """`rows` rows of KV cache for the running sequences: a view of a pool with one row more, which nothing reads or
    writes. Every view of rows 0..B-1 is then laid out alike for any B, `rows` included: never the whole pool,
    contiguous where the others are not, which the compiler would compile apart. So each compiled step has one
    version for all batches of 2 or more."""
    return model.new_kv_cache(batch_size=rows + 1, device=device, dtype=dtype).rows(0, rows)


def static_dims(view: KVCache) -> KVCache:
    """`view` for a function compiled with dynamic shapes, its layer, head, length and head-size dims marked
    static. As symbols, the compiler would equate them with any batch size or prompt width that happens to be equal
    while it traces (duck sizing): a 2-token warm-up prompt in a 2-layer model would compile a prefill for prompts
    as wide as the model has layers, and the first real prompt would compile another."""
    for cached in (view.k, view.v):
        for dim in (0, 2, 3, 4):
            torch._dynamo.mark_static(cached, dim)
        if cached._base is not None:  # the whole pool, which the compiler sees behind a view
            static_buffers(cached._base)
    return view


def static_buffers(*buffers: torch.Tensor) -> None:
    """Mark every dim of these whole buffers static, for compiled functions that take views of their first rows.
    As a symbol, a buffer's row count would be equated with the batch size it is first traced at where the two are
    equal (duck sizing), and every other batch size would then compile again."""
    for buffer in buffers:
        for dim in range(buffer.dim()):
            torch._dynamo.mark_static(buffer, dim)


def warn_speculation_off(e: Exception) -> None:
    """Where compiling the speculative step failed: the engine goes on without speculation, with a warning.
    Running out of memory is not the compiler's doing, and is raised."""
    if isinstance(e, torch.OutOfMemoryError):
        raise e
    log.warning("the speculative step failed to compile, so speculation is off: %s: %s", type(e).__name__, e)


def start_work(config: EngineConfig) -> str | None:
    """What an engine with this (resolved) config does before its first request, in words; None if it is quick."""
    graphs = config.cuda_graphs and config.device.startswith("cuda")
    if graphs and config.compile:
        return "capturing the compiled decode step as CUDA graphs, compiling the prefill"
    if graphs:
        return "capturing the decode step as CUDA graphs"
    return "compiling the decode step and the prefill" if config.compile else None


def start_summary(graphs: int, graph_seconds: float, compile_seconds: float, prefill_failed: bool = False) -> str:
    """How that went: '12 graphs in 30.1 s, prefill compiled in 15 s', or the seconds it took."""
    if not graphs:
        summary = f"{compile_seconds:.0f} s"
    else:
        summary = f"{graphs} graphs in {graph_seconds:.1f} s" + \
            (f", prefill compiled in {compile_seconds:.0f} s" if compile_seconds and not prefill_failed else "")
    return summary + ("; the prefill did not compile and runs eagerly (see the warning)" if prefill_failed else "")


@dataclass
class SamplingParams:
    max_tokens: int | None = 16  # None = up to the end of the context
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None = no log-probabilities; k >= 0 = the chosen token's and the top k
    echo: bool = False  # return the prompt (and, with logprobs, its tokens' log-probabilities) first
    ignore_eos: bool = False  # keep going past <|endoftext|> (benchmarks)


@dataclass
class TokenLogprob:
    token_id: int
    token: str  # the token's text (bytes decoded with replacement)
    logprob: float | None  # None for the first prompt token, which nothing predicts
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (id, text, logprob), best first


@dataclass
class Prompt:
    """A request's prompt, ready to queue: token ids, and the input rail's verdict (None without a guard)."""
    ids: list[int]
    verdict: Verdict | None = None
    checked_text: str = ""  # what the input rail read, for the audit


@dataclass
class Prefilled:
    """First event of every request: the prompt as the model saw it (for echo)."""
    prompt_text: str
    prompt_token_ids: list[int]
    prompt_logprobs: list[TokenLogprob] | None
    guard: Verdict | None = None  # the input rail's verdict (None without a guard)


@dataclass
class Delta:
    """New text of one choice; finish_reason ('stop', 'length' or 'content_filter') on its last delta."""
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None = None
    guard: Verdict | None = None  # on the last delta: the output rail's verdict on the whole choice


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    flops: float
    device_seconds: float
    energy_joules: float
    energy_measured: bool
    queue_seconds: float
    time_to_first_token: float | None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Finished:
    """Last event of a request that completed."""
    usage: Usage


@dataclass
class Failed:
    """Last event of a request that could not complete (e.g. it waited too long for a row)."""
    status: int
    message: str
    code: str | None = None  # the OpenAI error object's `code`, where one says more than the status


Event = Prefilled | Delta | Finished | Failed


@dataclass
class Result:
    """Everything a finished request produced, collected (what `RequestHandle.result()` returns)."""
    prompt: Prefilled
    texts: list[str]
    token_ids: list[list[int]]
    logprobs: list[list[TokenLogprob] | None]
    finish_reasons: list[str | None]
    usage: Usage
    guard: list[Verdict | None] = field(default_factory=list)  # per choice: the output rail's verdict


def new_request_id(counter: itertools.count) -> str:
    return f"req-{next(counter)}-{secrets.token_hex(4)}"


def _put_all(items: list[tuple[RequestHandle, Event]]) -> None:
    for handle, event in items:
        handle._put(event)


class RequestHandle:
    """The caller's side of one request: iterate events (async inside a loop, else `result()`), or cancel."""

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop | None):
        self._request = request
        self._loop = loop
        self._async_queue: asyncio.Queue | None = asyncio.Queue() if loop else None
        self._sync_queue: queue.SimpleQueue | None = None if loop else queue.SimpleQueue()
        self.done = False

    @property
    def id(self) -> str:
        return self._request.id

    def _put(self, event: Event) -> None:  # in the caller's loop (or any thread for a blocking handle)
        if self._async_queue is not None:
            self._async_queue.put_nowait(event)
        else:
            self._sync_queue.put(event)

    def cancel(self) -> None:
        """Stop generating; the engine frees the request's rows before its next decode step."""
        self._request.cancelled = True

    def poll(self) -> Event | None:
        """The next event if one is already here, else None (never waits)."""
        if self.done:
            return None
        try:
            event = self._async_queue.get_nowait() if self._async_queue is not None else self._sync_queue.get_nowait()
        except (asyncio.QueueEmpty, queue.Empty):
            return None
        self.done = isinstance(event, (Finished, Failed))
        return event

    def __aiter__(self):
        return self

    async def __anext__(self) -> Event:
        if self.done:
            raise StopAsyncIteration
        event = await self._async_queue.get()
        self.done = isinstance(event, (Finished, Failed))
        return event

    def events(self, timeout: float | None = None):
        """Blocking iteration for callers without an event loop."""
        while not self.done:
            event = self._sync_queue.get(timeout=timeout)
            self.done = isinstance(event, (Finished, Failed))
            yield event

    def result(self, timeout: float | None = None) -> Result:
        prompt, texts, ids, logprobs, reasons, verdicts = None, {}, {}, {}, {}, {}
        for event in self.events(timeout):
            if isinstance(event, Prefilled):
                prompt = event
            elif isinstance(event, Delta):
                texts[event.index] = texts.get(event.index, "") + event.text
                ids.setdefault(event.index, []).extend(event.token_ids)
                if event.logprobs is not None:
                    logprobs.setdefault(event.index, []).extend(event.logprobs)
                reasons[event.index] = event.finish_reason
                verdicts[event.index] = event.guard
            elif isinstance(event, Failed):
                raise LmforgeError(f"request failed ({event.status}): {event.message}")
            else:
                n = self._request.params.n
                return Result(prompt, [texts.get(i, "") for i in range(n)], [ids.get(i, []) for i in range(n)],
                              [logprobs.get(i) for i in range(n)], [reasons.get(i) for i in range(n)], event.usage,
                              [verdicts.get(i) for i in range(n)])
        raise LmforgeError("request ended without a result")


@dataclass(eq=False)
class Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrived: float
    verdict: Verdict | None = None  # the input rail's
    handle: RequestHandle | None = None
    cancelled: bool = False
    admitted: float | None = None
    first_token: float | None = None
    open_choices: int = 0
    completion_tokens: int = 0
    flops: float = 0.0
    device_seconds: float = 0.0
    energy_j: float = 0.0
    filtered: bool = False  # the output rail ended a choice


@dataclass(eq=False)
class Sequence:
    """One choice of one request, living in a KV-cache row while it runs."""
    request: Request
    index: int
    generator: torch.Generator | None  # sampled sequences' own RNG; greedy ones draw nothing
    decoder: Any  # the tokenizer's incremental UTF-8 decoder
    cached: int = 0  # positions of this row filled in the KV cache
    last_token: int = -1  # sampled, not yet fed to the model
    out_ids: list[int] = field(default_factory=list)
    counts: torch.Tensor | None = None  # (V,) how often each token was generated, for the penalties
    text: str = ""  # generated text so far, including what is held back
    token_ends: list[int] = field(default_factory=list)  # len(text) after each generated token
    logprobs: list[TokenLogprob] = field(default_factory=list)
    sent_tokens: int = 0
    last_emit: float = 0.0
    finish_reason: str | None = None
    rail: OutputRail | None = None  # with a guard: checks text before it is sent


def padded_batch_sizes(slots: int) -> list[int]:
    """The batch sizes decode graphs are captured for: the powers of two below `slots`, then `slots`."""
    return [1 << i for i in range(slots.bit_length()) if 1 << i < slots] + [slots]


def attend_lengths(max_len: int, shortest: int = GRAPH_MIN_ATTEND) -> list[int]:
    """The cached lengths decode graphs attend over: `shortest`, doubling, up to the whole cache."""
    lengths = []
    while shortest < max_len:
        lengths.append(shortest)
        shortest *= 2
    return lengths + [max_len]


class DecodeGraphs:
    """The decode step at fixed shapes, replayed as CUDA graphs (as vLLM does): one graph per (padded batch size,
    attended length, steps), so a step is one graph launch instead of one launch from Python per kernel.

    A step of B running sequences runs at the smallest captured batch b >= B and the smallest captured length that
    covers the furthest row's cached positions. Positions past a row's own are masked, as in any batched step, so
    the longer length changes no row's result. The b - B padding rows are the pool's rows B..b-1, which hold no
    sequence (running rows are always 0..B-1): each feeds token 0 from position 0 and writes only positions 0.. of
    its own free row (one per step, k + 1 per speculative step), where a prefill or a decode step overwrites them
    before anything reads them. Everything the step touches is static:
    token ids and positions in, the KV cache written in place (the commit is inside the graph), float logits and
    their argmax (the greedy tokens) out, valid until the next step.

    With `steps` > 1 a graph also holds that many greedy steps back to back: each feeds the argmax it computed to
    the next at the next position, and the tokens of all of them come out together (`ahead`).

    With `speculate` = k > 0, more graphs hold `steps` speculative steps (serve/speculation.py): each feeds every
    row its last token and k drafted ones, and emits 1 to k + 1 greedy tokens per row (`speculative`). A row
    advances by up to steps * (k + 1) positions, which the caller keeps inside the cache. They are captured for
    the padded batch sizes that cover `speculate_max_batch` rows, the batches the caller speculates at (compiled,
    one row is one version of the step and all larger batches another, given a cache from `sequence_rows`).

    `forward` is the model or its torch.compile'd self (the graphs then replay the compiled kernels). Without CUDA
    the same padded step runs eagerly, so that its bookkeeping can be tested on a CPU.
    """

    def __init__(self, model: Transformer, cache: KVCache, vocab: int, *, steps: int = 1,
                 shortest: int = GRAPH_MIN_ATTEND, forward: Callable[..., torch.Tensor] | None = None,
                 speculate: int = 0, speculate_max_batch: int | None = None,
                 verify: Callable[..., torch.Tensor] = propose_and_verify):
        slots, device = cache.batch_size, cache.k.device
        self.model, self.cache, self.vocab, self.steps = model, cache, vocab, steps
        self.forward = model if forward is None else forward
        self.batch_sizes = padded_batch_sizes(slots)
        self.lengths = attend_lengths(cache.max_len, shortest)
        # speculative graphs only where a burst of them fits in the cache, at the batch sizes that cover
        # speculate_max_batch rows (default: all)
        most = slots if speculate_max_batch is None else min(speculate_max_batch, slots)
        self.speculate = speculate if steps * (speculate + 1) <= cache.max_len and most >= 1 else 0
        self.speculate_batches = [b for b in self.batch_sizes if b <= self.bucket(most, 1)[0]] if self.speculate \
            else []
        self.verify = verify  # propose_and_verify or its torch.compile'd self
        # (batch, length, steps, speculative) -> graph
        self.graphs: dict[tuple[int, int, int, bool], torch.cuda.CUDAGraph] = {}
        pinned = device.type == "cuda"
        # each slot's token (column 0) and position (column 1): written on the host, copied to the device in one
        # piece. Slot-major, so that no step's positions start at an offset equal to a batch size (which the
        # compiler would take for a relation, as with the buffers marked static below)
        self._host = torch.zeros(slots, 2, dtype=torch.long, pin_memory=pinned)
        self._host_rows = self._host.numpy()
        self._inputs = torch.zeros(slots, 2, dtype=torch.long, device=device)
        self._logits = torch.zeros(slots, vocab, dtype=torch.float32, device=device)  # (slots, V)
        self._argmax = torch.zeros(slots, dtype=torch.long, device=device)  # (slots,)
        self._ahead = torch.zeros(steps, slots, dtype=torch.long, device=device)  # (steps, slots) greedy tokens
        if self.speculate:  # each slot's tokens by position (up to one past the cache), and a burst's output
            width = cache.max_len + 1
            self._host_history = torch.zeros(slots, width, dtype=torch.long, pin_memory=pinned)
            self._host_history_rows = self._host_history.numpy()
            self._history = torch.zeros(slots, width, dtype=torch.long, device=device)
            # the tokens and positions a speculative step feeds: apart from _inputs, so that the compiled step
            # never takes two views of one tensor (it updates the tokens in place)
            self._tokens = torch.zeros(slots, dtype=torch.long, device=device)
            self._positions = torch.zeros(slots, dtype=torch.long, device=device)
            self._out = torch.zeros(slots, steps * (self.speculate + 1), dtype=torch.long, device=device)
            self._count = torch.zeros(slots, dtype=torch.long, device=device)
            static_buffers(self._history, self._tokens, self._positions, self._out, self._count)
        static_buffers(self._inputs)

    def bucket(self, batch: int, furthest: int) -> tuple[int, int]:
        """The (batch, attended length) a step of `batch` rows runs at when its furthest row has `furthest` cached."""
        return (next(b for b in self.batch_sizes if b >= batch), next(n for n in self.lengths if n >= furthest))

    def capture(self) -> float:
        """Capture every graph; returns the seconds it took. Only while no row holds a sequence: the warm-up runs
        write rows 0..b-1 at positions 0..steps-1 (0..steps * (k + 1) - 1 speculating).

        The largest graphs are captured first and the others share their memory pool (they never run together).
        """
        start = time.perf_counter()
        shapes = [(b, n, k, False) for b in self.batch_sizes for n in self.lengths for k in {1, self.steps}]
        shapes = sorted(shapes + [(b, n, self.steps, True) for b in self.speculate_batches for n in self.lengths],
                        reverse=True)
        self._host.zero_()
        self._inputs.zero_()
        side = torch.cuda.Stream(self._inputs.device)  # capture needs a stream other than the default one
        side.wait_stream(torch.cuda.current_stream(self._inputs.device))
        with torch.cuda.stream(side):  # lazy initialisation (cuBLAS handles, kernels loaded, compiling) happens here
            if self.speculate:  # the newest part: a server without speculation rather than none
                try:
                    for shape in (shape for shape in shapes if shape[3]):
                        self._inputs.zero_()
                        self._run(*shape)
                except Exception as e:
                    warn_speculation_off(e)
                    self.speculate, self.speculate_batches = 0, []
                    shapes = [shape for shape in shapes if not shape[3]]
            for shape in (shape for shape in shapes if not shape[3]):
                self._inputs.zero_()
                self._run(*shape)
        torch.cuda.current_stream(self._inputs.device).wait_stream(side)
        pool = None
        for shape in shapes:
            graph = torch.cuda.CUDAGraph()
            # thread_local: CUDA calls from other threads (an HTTP server, a tokenizer) do not break the capture
            with torch.cuda.graph(graph, pool=pool, stream=side, capture_error_mode="thread_local"):
                self._run(*shape)
            pool = pool or graph.pool()
            self.graphs[shape] = graph
        torch.cuda.synchronize(self._inputs.device)
        return time.perf_counter() - start

    def _forward(self, batch: int, length: int, tokens: torch.Tensor, keep_logits: bool) -> None:
        """The padded step, from the static inputs into the static outputs: what a graph records. The argmax goes
        to `tokens` (b,), the logits to their buffer only where wanted (a burst reads none)."""
        view = static_dims(self.cache.rows(0, batch))
        view.attend_len = length
        positions = self._inputs[:batch, 1]  # (b,)
        logits = self.forward(self._inputs[:batch, :1], kv_cache=view, start_pos=positions)  # (b, 1, V)
        view.commit(positions)
        logits = logits[:, 0, : self.vocab]  # (b, V)
        if keep_logits:
            self._logits[:batch].copy_(logits)
        torch.argmax(logits, dim=-1, out=tokens)

    def _run(self, batch: int, length: int, steps: int, speculative: bool = False) -> None:
        """`steps` padded steps, each fed the previous one's argmax at the next position (or speculative steps)."""
        if speculative:
            self._speculate(batch, length, steps)
            return
        if steps == 1:
            self._forward(batch, length, self._argmax[:batch], keep_logits=True)
            return
        for k in range(steps):
            self._forward(batch, length, self._ahead[k, :batch], keep_logits=False)
            if k < steps - 1:
                self._inputs[:batch, 0].copy_(self._ahead[k, :batch])
                self._inputs[:batch, 1] += 1

    def _speculate(self, batch: int, length: int, steps: int) -> None:
        """`steps` padded speculative steps from the tokens and positions in _inputs and the history in _history:
        the emitted tokens go to _out, how many to _count."""
        view = static_dims(self.cache.rows(0, batch))
        view.attend_len = length
        tokens, positions, count = self._tokens[:batch], self._positions[:batch], self._count[:batch]
        tokens.copy_(self._inputs[:batch, 0])
        positions.copy_(self._inputs[:batch, 1])
        count.zero_()
        for _ in range(steps):
            advance = self.verify(self.model, tokens, positions, self._history[:batch], self._out[:batch], count,
                                  view, self.vocab, self.speculate)
            view.commit(positions)
            positions += advance

    def _replay(self, batch: int, length: int, steps: int, speculative: bool = False) -> None:
        graph = self.graphs.get((batch, length, steps, speculative))
        if graph is not None:
            graph.replay()
        else:  # not captured (a CPU): the same steps, eagerly
            self._run(batch, length, steps, speculative)

    def _load(self, tokens: list[int], positions: list[int]) -> None:
        B = len(tokens)
        self._host_rows[:B, 0] = tokens
        self._host_rows[:B, 1] = positions
        self._host_rows[B:] = 0  # padding rows: token 0 from position 0 of their own free rows
        self._inputs.copy_(self._host, non_blocking=True)

    def step(self, tokens: list[int], positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed rows 0..B-1 tokens[i] at positions[i]: their logits (B, V) and argmax (B,), valid until the next
        step. The caller reads them on the host before that (which also ends the copy from the host buffer)."""
        B = len(tokens)
        b, n = self.bucket(B, max(positions))
        self._load(tokens, positions)
        self._replay(b, n, 1)
        return self._logits[:B], self._argmax[:B]

    def ahead(self, tokens: list[int], positions: list[int]) -> list[list[int]]:
        """`self.steps` greedy steps from rows 0..B-1's tokens at their positions: the tokens, (steps, B), on the
        host. Row i then has written positions[i] .. positions[i] + steps - 1, so these must fit in the cache."""
        B = len(tokens)
        b, n = self.bucket(B, max(positions) + self.steps - 1)
        self._load(tokens, positions)
        self._replay(b, n, self.steps)
        return self._ahead[:, :B].tolist()

    def speculative(self, tokens: list[int], positions: list[int], histories: list[list[int]]) -> list[list[int]]:
        """`self.steps` speculative steps from rows 0..B-1's tokens at their positions, histories[i] being row i's
        tokens at positions 0..positions[i]: each row's emitted greedy tokens (1 to k + 1 per step), on the host.
        Row i then has written up to positions[i] + steps * (k + 1) - 1, so these must fit in the cache."""
        B = len(tokens)
        b, n = self.bucket(B, max(positions) + self.steps * (self.speculate + 1))
        self._load(tokens, positions)
        rows = self._host_history_rows
        for i, history in enumerate(histories):
            rows[i, : len(history)] = history
        rows[B:b] = 0  # padding rows: token 0 from position 0, as in _load
        self._history[:b].copy_(self._host_history[:b], non_blocking=True)
        self._replay(b, n, self.steps, speculative=True)
        counts = self._count[:B].tolist()
        return [row[:count] for row, count in zip(self._out[:B].tolist(), counts)]


class RequestChecker:
    """The request side of an engine, with no model: a prompt (text, ids or chat messages) to token ids through
    the input rail, and the checks a request passes before it is queued. The Engine is one; so is its stand-in in
    the HTTP process when the engine runs in a process of its own (engine_process.py)."""

    def __init__(self, tokenizer: Tokenizer, chat_template: str, guard: Guard | None, metrics: ServeMetrics,
                 context_len: int, slots: int):
        self.tokenizer, self.chat_template, self.guard, self.metrics = tokenizer, chat_template, guard, metrics
        self.context_len, self.slots = context_len, slots
        # a chat turn ends at <|end|> (imported tokenizers may lack it: then at the end-of-text token alone)
        end_of_turn = tokenizer.special_ids.get(END_OF_TURN)
        self.chat_stop_token_ids = () if end_of_turn is None else (end_of_turn,)

    def render_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Prompt token ids for chat messages ([{"role", "content"}]) under the checkpoint's chat template."""
        try:
            return render_chat(self.chat_template, messages, self.tokenizer)
        except jinja2.TemplateError as e:
            raise InvalidRequest(f"cannot apply the chat template to these messages: {e}") from None

    def prepare(self, prompt: str | list[int] | None = None, *,
                messages: list[dict[str, str]] | None = None) -> Prompt:
        """The token ids of a prompt (text or ids) or of chat messages, after the input rail when there is a guard.

        No model compute, and safe from any thread; with a guard it takes milliseconds (the semantic classifier),
        so a server calls it off its event loop. A chat is checked message by message and redacted inside each
        message's content, so roles and template stay intact.
        """
        if (prompt is None) == (messages is None):
            raise ValueError("prepare takes a prompt or messages, not both")
        if self.guard is None:  # `check` (in submit) validates the ids
            if messages is not None:
                return Prompt(self.render_chat(messages))
            return Prompt(self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt))
        if messages is not None:
            screened = screen_input(self.guard, [m["content"] for m in messages])
            ids = self.render_chat([dict(m, content=text) for m, text in zip(messages, screened.texts)])
        else:
            if isinstance(prompt, list):  # before decoding them for the guard
                self._check_token_ids(prompt)
            screened = screen_input(self.guard, [prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt)])
            redacted = screened.verdict.action == "redact"
            ids = self.tokenizer.encode(screened.texts[0]) if isinstance(prompt, str) or redacted else list(prompt)
        v = screened.verdict
        self._count_guard("input", v.action, v.findings, v.seconds)
        return Prompt(ids, v, v.text)

    def _check_token_ids(self, ids: list[int]) -> None:
        if ids and (min(ids) < 0 or max(ids) >= self.tokenizer.vocab_size):
            raise InvalidRequest(f"token ids must lie in 0..{self.tokenizer.vocab_size - 1}")

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequest naming what is wrong with the request, before it is queued."""
        p = params
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty; send at least one character or token")
        if len(prompt_ids) > self.context_len:
            raise InvalidRequest(f"the prompt has {len(prompt_ids)} tokens but the model's context is "
                                 f"{self.context_len}; shorten the prompt")
        self._check_token_ids(prompt_ids)
        if p.max_tokens is not None:
            if p.max_tokens < 0:
                raise InvalidRequest(f"max_tokens must be >= 0, got {p.max_tokens}")
            if p.max_tokens == 0 and not p.echo:
                raise InvalidRequest("max_tokens 0 generates nothing; it is only useful with echo")
            if len(prompt_ids) + p.max_tokens > self.context_len:
                raise InvalidRequest(
                    f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({p.max_tokens}) exceeds the model's "
                    f"context of {self.context_len} tokens; ask for at most {self.context_len - len(prompt_ids)}")
        if not (math.isfinite(p.temperature) and 0 <= p.temperature <= MAX_TEMPERATURE):
            raise InvalidRequest(f"temperature must lie in 0..{MAX_TEMPERATURE:g} (0 = greedy), got {p.temperature}")
        if not 0 < p.top_p <= 1:
            raise InvalidRequest(f"top_p must lie in (0, 1], got {p.top_p}")
        if p.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0 (0 = off), got {p.top_k}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(p, name) <= 2:
                raise InvalidRequest(f"{name} must lie in -2..2, got {getattr(p, name)}")
        if len(p.stop) > MAX_STOPS or any(not 0 < len(stop) <= MAX_STOP_CHARS for stop in p.stop):
            raise InvalidRequest(f"stop takes at most {MAX_STOPS} non-empty strings of at most {MAX_STOP_CHARS} "
                                 f"characters each")
        if not 1 <= p.n <= self.slots:
            raise InvalidRequest(f"n must lie in 1..{self.slots} (this server's sequence slots), got {p.n}")
        if p.logprobs is not None and not 0 <= p.logprobs <= 20:
            raise InvalidRequest(f"logprobs must lie in 0..20, got {p.logprobs}")
        if p.echo and p.n > 1:
            raise InvalidRequest("echo with n > 1 is not supported; send n = 1")

    def _count_guard(self, direction: str, action: str, findings, seconds: float) -> None:
        self.metrics.guard_checks.labels(direction, action).inc()
        self.metrics.guard_seconds.labels(direction).observe(seconds)
        for f in findings:
            self.metrics.guard_findings.labels(direction, f.category, f.action).inc()


class Engine(RequestChecker):
    """Continuous batching over one model; thread-safe `submit`, one worker thread."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig, *, model_id: str | None = None,
                 ledger: Ledger | None = None, run_id: int | None = None, metrics: ServeMetrics | None = None,
                 power_watts: float | None = None, guard: Guard | None = None):
        config.validate()
        self.config = config
        self.loaded = loaded
        self.model = loaded.model
        self.model_id = model_id or loaded.config.name or loaded.path.parent.parent.name
        self.created = int(time.time())
        self.shape = self.model.shape
        self.device = self.model.embed.weight.device
        self.dtype = torch.bfloat16 if self.device.type == "cuda" and config.dtype in ("auto", "bf16") else \
            torch.float32
        if self.dtype != self.model.embed.weight.dtype:
            self.model.to(self.dtype)
        if self.device.type == "cuda":  # q/k/v and gate/up as one matmul each: 3 kernels fewer per layer and step
            self.model.fuse_projections()  # (on a CPU, no faster: bench/RESULTS.md, serving)
        context_len = self.shape.max_seq_len
        row_bytes = 2 * self.shape.n_layer * self.shape.n_kv_head * context_len * self.shape.head_dim * \
            (2 if self.dtype == torch.bfloat16 else 4)
        rows = config.max_concurrency
        if config.kv_cache_mb:  # the pool holds the sequences' rows and one spare (below)
            rows = min(rows, int(config.kv_cache_mb * 2**20 // row_bytes) - 1)
            if rows < 1:
                raise LmforgeError(f"--kv-cache-mb {config.kv_cache_mb} is less than one sequence's KV cache and "
                                   f"the engine's spare row ({row_bytes / 2**20:.2f} MB each at context "
                                   f"{context_len}); raise it")
        super().__init__(loaded.tokenizer, loaded.chat_template, guard, metrics or ServeMetrics(), context_len, rows)
        self.ledger, self.run_id = ledger, run_id
        self.eos_id = self.tokenizer.eot_id
        # an imported model may have more embedding rows than its tokenizer has tokens (padding): never sampled
        self.vocab = self.tokenizer.vocab_size
        self.kv_cache_bytes = (rows + 1) * row_bytes
        self.cache = sequence_rows(self.model, rows, self.device, self.dtype)
        # with compile, the decode step and the prefill run compiled: batch size, prompt length and cached length
        # vary, so with dynamic shapes (warm_up compiles them before the first request). The prefill is compiled
        # apart: torch.compile keeps at most 8 versions of a function, and each takes up to 4 (one row or more,
        # attending over the whole cache or less)
        self._decode_model = torch.compile(self.model, dynamic=True) if config.compile else self.model
        self._prefill_forward = torch.compile(prefill_logits, dynamic=True) if config.compile else prefill_logits
        self._verify = compiled_propose_and_verify() if config.compile else propose_and_verify
        self._speculate_batch = config.speculate_max_batch or \
            (0 if self.device.type == "cuda" else CPU_SPECULATE_MAX_BATCH)  # resolved: 0 = never
        self._speculation_failed = False  # its compile failed at warm_up (the graphs handle theirs themselves)
        # on CUDA the decode step replays graphs (of the compiled step, with compile), captured now while no row
        # holds a sequence
        self.decode_graphs: DecodeGraphs | None = None
        self.graph_seconds = 0.0  # spent capturing them (and compiling, with compile)
        if config.cuda_graphs and self.device.type == "cuda":
            self.decode_graphs = DecodeGraphs(self.model, self.cache, self.vocab, steps=config.decode_steps,
                                              forward=self._decode_model, speculate=config.speculate,
                                              speculate_max_batch=self._speculate_batch, verify=self._verify)
            with torch.inference_mode():
                self.graph_seconds = self.decode_graphs.capture()
        self._flops_base = forward_flops_per_token(self.shape, 0)  # per token: the matmuls
        self._flops_per_key = forward_flops_per_token(self.shape, 1) - self._flops_base  # plus this per key
        self.metrics.slots.set(rows)

        self._token_text = [self.tokenizer.decode([i]) for i in range(self.tokenizer.vocab_size)]
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: list[Sequence] = []  # row i of the cache holds _running[i]
        # rows for the ledger, appended from any thread (a refused request is recorded by the caller's)
        self._finished_rows: collections.deque[dict[str, Any]] = collections.deque()
        self._audit_rows: collections.deque[dict[str, Any]] = collections.deque()  # guard findings
        self._outbox: list[tuple[Request, Event]] = []  # events of the current step, delivered at its end
        # where set, takes each step's events (request id, event) in place of the handles (engine_process.py)
        self.forward_events: Callable[[list[tuple[str, Event]]], None] | None = None
        # where set, the engine thread calls it between steps to take in requests (submit, cancel) that arrived
        # meanwhile, waiting up to the given seconds for one when idle: no other thread then calls the engine
        self.receive: Callable[[float], None] | None = None
        self._wake = threading.Condition()
        self._stop = False
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        # the device profile: declared power (for the estimate where nothing measures) and price
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None
        profile = resolve_profile(self.device.type, name, need_peak=False)
        power_watts = power_watts or profile.tdp_watts
        self.price_per_hour = profile.price_per_hour
        self._energy = make_energy_reader(self.device.type, self.device.index or 0, declared_watts=power_watts)
        self.energy_measured = self._energy.measured
        self.energy_label = self._energy.label
        self._watts = power_watts  # until the first window closes
        self._window_start, self._window_joules = time.monotonic(), 0.0
        self._flushed = time.monotonic()
        self.error: BaseException | None = None

    @classmethod
    def from_checkpoint(cls, path: Path, config: EngineConfig, **kwargs) -> Engine:
        return cls(load_model(path, resolve_device(config.device)), config, **kwargs)

    # ---- the caller's side -------------------------------------------------------------------------------

    def warm_up(self) -> float:
        """Compile the decode step and the prefill now, not on the first requests: each call below is one more
        shape the compiler needs to see before its graph is general (batch 1 and 2 are special cases, then the
        cached length); after them, serving compiles nothing more (a test checks). The CUDA graphs compiled the
        decode step already, as they were captured.

        Returns the seconds it took (0 without compile). The rows it writes hold no sequence yet.
        """
        if not self.config.compile:
            return 0.0
        start = time.perf_counter()
        with torch.inference_mode():
            if self.decode_graphs is None:
                for batch, cached in ((1, 1), (2, 2), (3, 3), (4, 5), (1, 7)):
                    view = self.cache.rows(0, min(batch, self.slots))
                    positions = torch.full((view.batch_size,), cached, dtype=torch.long, device=self.device)
                    idx = torch.zeros(view.batch_size, 1, dtype=torch.long, device=self.device)
                    self._eager_step(idx, positions, view, cached)
                if self.speculates_up_to:  # the speculative step, up to the batch it runs at
                    self._warm_up_speculation()
            for batch, length in ((1, 2), (2, 3)):  # prefills
                batch = min(batch, self.slots)
                self._prefill_logits(self.cache.rows(0, batch),
                                     torch.zeros(batch, length, dtype=torch.long, device=self.device),
                                     torch.full((batch,), length - 1, device=self.device))
        return time.perf_counter() - start

    def _warm_up_speculation(self) -> None:
        """One speculative step at each shape the compiler needs to see, at positions where its k + 1 tokens fit
        in the context. Should it fail to compile, the engine decodes without speculation, with a warning."""
        k = self.config.speculate
        try:
            for batch, cached in ((1, 2), (2, 3), (3, 4), (1, 7)):
                batch, cached = min(batch, self.speculates_up_to), min(cached, self.context_len - k - 1)
                self._speculate_eagerly([0] * batch, [cached] * batch, [[0] * (cached + 1)] * batch, [0] * batch, 1)
        except Exception as e:
            warn_speculation_off(e)
            self._speculation_failed = True

    def start(self) -> Engine:
        """Run the engine in a new thread (tests, embedding); `lmforge serve` uses `run` instead."""
        self._energy.start()
        self._power(restart=True)
        self._thread = threading.Thread(target=self._loop, name="lmforge-engine", daemon=True)
        self._thread.start()
        return self

    def run(self) -> None:
        """Run the engine in this thread until `stop()` (from another thread) or `request_stop()`.

        The main thread is the fast place on a CPU: torch's OpenMP workers serve the main thread's small matmuls
        about twice as fast as another thread's (measured with 2 threads, torch 2.13; bench/RESULTS.md).
        """
        self._energy.start()
        self._power(restart=True)
        self._thread = threading.current_thread()
        try:
            self._loop()
        finally:
            self._flush_ledger()

    def request_stop(self) -> None:
        """Ask `run()` to return after the current step: safe from a signal handler (takes no lock)."""
        self._stop = True

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._flush_ledger()

    def submit(self, prompt: str | list[int] | Prompt, params: SamplingParams, *,
               request_id: str | None = None, arrived: float | None = None) -> RequestHandle:
        """Queue a request; its events arrive on the handle. Raises InvalidRequest or Overloaded.

        A prompt the input rail blocked is answered at once with the refusal and never queued. `arrived`: when
        the request arrived, on time.monotonic()'s clock, if earlier than now (another process on this machine
        took it in: the clock is system-wide); its queue timeout and time to first token count from then."""
        if not isinstance(prompt, Prompt):
            prompt = self.prepare(prompt)
        self.check(prompt.ids, params)
        if self._thread is not None and not self.alive and not self._stop:
            raise LmforgeError(f"the engine is not running (last error: {self.error})")
        request = Request(request_id or new_request_id(self._ids), prompt.ids, params,
                          time.monotonic() if arrived is None else arrived, prompt.verdict)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        request.handle = RequestHandle(request, loop)
        if prompt.verdict is not None:
            self._audit_rows.extend(audit_rows("input", prompt.verdict.findings, prompt.checked_text, request.id,
                                               self.guard.policy.store_text))
            if prompt.verdict.blocked:
                self._refuse(request)
                return request.handle
        with self._wake:
            if len(self._waiting) >= self.config.max_queue:
                self.metrics.rejected.labels("queue_full").inc()
                raise Overloaded(f"the server is at capacity ({self.slots} running, {len(self._waiting)} "
                                 f"waiting); retry shortly", retry_after=1)
            self._waiting.append(request)
            self.metrics.queue_depth.set(len(self._waiting))
            self._wake.notify()
        return request.handle

    def _refuse(self, request: Request) -> None:
        """Answer a request the input rail blocked: the refusal as every choice's text, no model compute."""
        p = request.params
        self._record(request, "blocked:input")
        events: list[Event] = [Prefilled(self.tokenizer.decode(request.prompt_ids), list(request.prompt_ids), None,
                                         request.verdict)]
        events += [Delta(i, self.guard.policy.refusal, [], [] if p.logprobs is not None else None, "content_filter")
                   for i in range(p.n)]
        events.append(Finished(self._usage(request, time.monotonic())))
        for event in events:
            request.handle._put(event)

    def generate(self, prompt: str | list[int] | Prompt, params: SamplingParams,
                 timeout: float | None = None) -> Result:
        """Submit and wait: the engine called directly, without HTTP."""
        return self.submit(prompt, params).result(timeout)

    @property
    def alive(self) -> bool:
        """The worker thread runs (a failed step fails its requests but does not stop it)."""
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> dict[str, int]:
        with self._wake:
            return {"running": len(self._running), "waiting": len(self._waiting), "slots": self.slots}

    # ---- the worker thread -------------------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                busy = bool(self._waiting or self._running)
                if self.receive is not None:  # requests come down a pipe, read here between steps
                    self.receive(0.0 if busy else IDLE_WAIT_S)
                with self._wake:
                    if not (busy or self._waiting or self._stop) and self.receive is None:
                        self._wake.wait(timeout=IDLE_WAIT_S)  # also notices request_stop() from a signal
                    if self._stop:
                        return
                    admitted = self._admit()
                if not busy:  # a new power window after idling: idle time never dilutes the busy power
                    self._power(restart=True)
                try:
                    self._step(admitted)
                except Exception as e:  # a bug or a failing device: fail the requests in flight, keep serving
                    log.exception("engine step failed")
                    self.error = e
                    failed = {id(s.request): s.request for s in self._running + admitted}
                    for request in failed.values():
                        self._fail(request, 500, f"internal error: {type(e).__name__}: {e}")
                    self._running.clear()
                self._deliver()
                self._flush_ledger_if_due()

    def _step(self, admitted: list[Sequence]) -> None:
        self._drop_cancelled()
        self._retire()
        if admitted:
            self._prefill(admitted)
            self._retire()
            self._deliver()  # the first tokens go out now, not after the decode step (a burst takes a while)
        if self._running:
            self._decode()
            self._retire()

    def _admit(self) -> list[Sequence]:
        """Called with the lock held: time out, drop or admit waiting requests (FIFO) while rows are free."""
        now = time.monotonic()
        admitted: list[Sequence] = []
        free = self.slots - len(self._running)
        kept: collections.deque[Request] = collections.deque()
        while self._waiting:
            request = self._waiting.popleft()
            if request.cancelled:
                self.metrics.cancelled.inc()
                self._record(request, "cancelled")
                self._send(request, Finished(self._usage(request, now)))
                continue
            if now - request.arrived > self.config.queue_timeout:
                self.metrics.rejected.labels("queue_timeout").inc()
                self._fail(request, 429, f"waited {self.config.queue_timeout:g} s for a free slot without "
                                         f"getting one; the server is overloaded, retry later",
                           code="queue_timeout")
                continue
            if kept or request.params.n > free:  # FIFO: nobody overtakes a request that does not fit yet
                kept.append(request)
                continue
            free -= request.params.n
            request.admitted, request.open_choices = now, request.params.n
            for index in range(request.params.n):
                seed = request.params.seed
                generator = None
                if request.params.temperature >= GREEDY_BELOW:  # greedy never draws (and `secrets` is a syscall)
                    generator = torch.Generator(device=self.device)
                    generator.manual_seed(secrets.randbits(63) if seed is None else (seed + index) % 2**63)
                rail = OutputRail(self.guard) if self.guard is not None else None
                admitted.append(Sequence(request, index, generator, self.tokenizer.decode_stream(), rail=rail))
        self._waiting = kept
        self.metrics.queue_depth.set(len(kept))
        return admitted

    def _drop_cancelled(self) -> None:
        for seq in self._running:
            if seq.request.cancelled and seq.finish_reason is None:
                seq.finish_reason = "cancelled"

    def _prefill(self, seqs: list[Sequence]) -> None:
        """Run the new sequences' prompts together (padded to the longest) and sample each one's first token.

        Requests that asked for their prompt's log-probabilities (echo) need the logits at every position: their
        prompts run eagerly, apart from the others, whose prefill is compiled (with compile). So no prompt's
        arithmetic depends on whether an echo request shares its step."""
        start = time.perf_counter()
        seqs.sort(key=self._wants_prompt_logprobs)  # their rows after the others'
        first_row = len(self._running)
        self._running.extend(seqs)
        lengths = [len(s.request.prompt_ids) for s in seqs]
        plain = sum(1 for s in seqs if not self._wants_prompt_logprobs(s))
        logits, full = [], []
        for a, b in ((0, plain), (plain, len(seqs))):
            if a == b:
                continue
            # compiled prompts are at least 2 wide: one-token prompts would be a shape of their own for the compiler
            # (it specialises sizes 0 and 1); padding's keys and values land past the prompt, where decoding
            # overwrites them before anything reads them (as with any prompt shorter than the longest)
            compiled = a < plain
            width = min(max(2, *lengths[a:b]), self.context_len) if compiled else max(lengths[a:b])
            idx = torch.zeros(b - a, width, dtype=torch.long)
            for i, s in enumerate(seqs[a:b]):
                idx[i, : lengths[a + i]] = torch.tensor(s.request.prompt_ids)
            idx, last = idx.to(self.device), torch.tensor(lengths[a:b], device=self.device) - 1
            view = self.cache.rows(first_row + a, first_row + b)
            if compiled:
                logits.append(self._prefill_logits(view, idx, last))
                continue
            view.attend_len = 0  # nothing cached before the prompts
            zeros = torch.zeros(b - a, dtype=torch.long, device=self.device)
            every = self.model(idx, kv_cache=view, start_pos=zeros)[..., : self.vocab].float()  # (B, T, V)
            view.commit(zeros)
            full = list(every)
            logits.append(every[torch.arange(b - a), last])
        logits = torch.cat(logits)  # (B, V)
        for s, n in zip(seqs, lengths):
            s.cached = n
        tokens = self._sample(seqs, logits)
        self._account(seqs, lengths, time.perf_counter() - start)
        for i, s in enumerate(seqs):
            if s.index == 0:
                prompt_logprobs = self._prompt_logprobs(s.request, full[i - plain]) if i >= plain else None
                self._send(s.request, Prefilled(self.tokenizer.decode(s.request.prompt_ids),
                                                 list(s.request.prompt_ids), prompt_logprobs, s.request.verdict))
                self.metrics.prompt_tokens.inc(lengths[i])
        self._append(seqs, tokens, logits)

    @staticmethod
    def _wants_prompt_logprobs(s: Sequence) -> bool:
        return s.request.params.echo and s.request.params.logprobs is not None

    def _prefill_logits(self, view: KVCache, idx: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Run prompts idx (B, T) into fresh cache rows `view` (written); the float logits (B, V) at positions
        last (B,).

        If the compiled prefill fails (compiling it is newer than compiling the decode step, and a GPU compiles
        other kernels than a CPU), it runs eagerly from then on, with a warning: slower serving rather than none."""
        view.attend_len = 0  # nothing cached before the prompts
        zeros = torch.zeros(idx.size(0), dtype=torch.long, device=self.device)
        try:
            logits = self._prefill_forward(self.model, idx, static_dims(view), zeros, last, self.vocab)
        except Exception as e:
            if not self.prefill_compiled or isinstance(e, torch.OutOfMemoryError):  # not the compiler's doing
                raise
            log.warning("compiling the prefill failed, so it runs eagerly (slower): %s: %s", type(e).__name__, e)
            self._prefill_forward = prefill_logits
            view.staged.clear()
            logits = prefill_logits(self.model, idx, view, zeros, last, self.vocab)
        view.commit(zeros)
        return logits

    @property
    def speculates_up_to(self) -> int:
        """The most running sequences the engine speculates at (--speculate-max-batch, resolved). 0: it does not,
        also where no speculative step fits in the context, or compiling it failed."""
        if self.decode_graphs is not None:  # its bursts are whole graphs: they fit, and compiled, or not at all
            possible = self.decode_graphs.speculate > 0
        else:
            possible = 0 < self.config.speculate <= self.context_len - 2 and not self._speculation_failed
        return min(self._speculate_batch, self.slots) if possible else 0

    @property
    def prefill_compiled(self) -> bool:
        """The prefill runs compiled: compile is on, and compiling it has not failed."""
        return self._prefill_forward is not prefill_logits

    def _decode(self) -> None:
        """Feed every running sequence its last token at its own position; sample the next.

        Where every running sequence is greedy and nothing needs its logits (no penalties, no log-probabilities),
        up to `decode_steps` tokens are decoded in one go, each step's argmax fed to the next on the device: one
        wait for the device, one pass of bookkeeping and one burst of events per scheduler step, not per token
        (vLLM's multi-step scheduling). A sequence that finishes inside the burst (a stop, its max_tokens) drops
        the tokens after it, so outputs are those of one token per step. New requests and cancellations wait for
        the burst's end.
        """
        forwards = self._speculative_forwards()
        if forwards:
            self._decode_speculative(forwards)
            return
        steps = self._steps_ahead()
        if steps > 1:
            self._decode_ahead(steps)
            return
        start = time.perf_counter()
        seqs = self._running
        if self.decode_graphs is not None:
            logits, argmax = self.decode_graphs.step([s.last_token for s in seqs], [s.cached for s in seqs])
        else:
            idx, positions, view = self._eager_inputs(seqs)
            logits = self._eager_step(idx, positions, view, max(s.cached for s in seqs)).float()  # (B, V)
            argmax = None
        for s in seqs:
            s.cached += 1
        tokens = self._sample(seqs, logits, argmax)
        self._account(seqs, [1] * len(seqs), time.perf_counter() - start)
        self._append(seqs, tokens, logits)

    def _eager_inputs(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor, KVCache]:
        """Each sequence's last token (B, 1) and position (B,), and the cache rows they run in."""
        idx = torch.tensor([[s.last_token] for s in seqs], dtype=torch.long, device=self.device)
        positions = torch.tensor([s.cached for s in seqs], dtype=torch.long, device=self.device)
        return idx, positions, self.cache.rows(0, len(seqs))

    def _eager_step(self, idx: torch.Tensor, positions: torch.Tensor, view: KVCache, attend_len: int) -> torch.Tensor:
        """One decode step without graphs, its keys and values written to the cache: the logits (B, V).

        It reads at least 2 cached positions: a length of 1 would be a shape of its own for the compiler, and
        positions past a row's own are masked anyway."""
        view.attend_len = max(2, attend_len)
        logits = self._decode_model(idx, kv_cache=view, start_pos=positions)[:, 0, : self.vocab]
        view.commit(positions)
        return logits

    def _steps_ahead(self) -> int:
        """Greedy steps the running batch takes at once (see _decode): 1 where any sequence needs its logits,
        never past the end of a row's cache. The graphs run whole bursts of `decode_steps` (their tokens past a
        sequence's end are dropped); eager steps stop when the sequence with the most tokens to go is done."""
        most = self.config.decode_steps
        if most == 1 or not self._plain_greedy():
            return 1
        room, to_go = most, 1
        for s in self._running:
            room = min(room, self.context_len - s.cached)  # positions cached .. cached + steps - 1 are written
            to_go = max(to_go, self._to_go(s))
        if self.decode_graphs is not None:
            return most if room == most else 1
        return max(1, min(room, to_go))

    def _to_go(self, s: Sequence) -> int:
        """Tokens the sequence may still produce (its max_tokens left, or up to the context)."""
        max_tokens = s.request.params.max_tokens
        return self.context_len if max_tokens is None else max_tokens - len(s.out_ids)

    def _plain_greedy(self) -> bool:
        """Every running sequence is greedy, and none needs its logits (penalties, log-probabilities)."""
        return not any(p.temperature >= GREEDY_BELOW or p.presence_penalty or p.frequency_penalty or
                       p.logprobs is not None for p in (s.request.params for s in self._running))

    def _speculative_forwards(self) -> int:
        """Speculative steps the running batch takes at once (0: none, decode as usual). Speculation needs what
        bursts need (_steps_ahead), at most speculates_up_to sequences, and room in every row's cache for each
        step to advance it by up to k + 1 positions: `decode_steps` steps with graphs (a graph is a whole burst),
        as many as fit without."""
        k, most = self.config.speculate, self.config.decode_steps
        if len(self._running) > self.speculates_up_to or not self._plain_greedy():
            return 0
        room = self.context_len - max(s.cached for s in self._running)
        if self.decode_graphs is not None:
            return most if room >= most * (k + 1) else 0
        return min(most, room // (k + 1))

    def _decode_speculative(self, forwards: int) -> None:
        """Up to `forwards` speculative steps for every running sequence (serve/speculation.py): each emits 1 to
        k + 1 greedy tokens per sequence, the tokens one-token steps would have produced. As in a burst
        (_decode_ahead), tokens past a sequence's end are dropped, and the text goes out at the burst's end."""
        started = time.monotonic()
        seqs = self._running
        k = self.config.speculate
        tokens, positions = [s.last_token for s in seqs], [s.cached for s in seqs]
        histories = [s.request.prompt_ids + s.out_ids for s in seqs]  # each row's tokens at positions 0..cached
        if self.decode_graphs is not None:
            emitted = self.decode_graphs.speculative(tokens, positions, histories)
        else:
            emitted, forwards = self._speculate_eagerly(tokens, positions, histories, [self._to_go(s) for s in seqs],
                                                        forwards)
        seconds = time.monotonic() - started
        kept = [0] * len(seqs)
        for i, (s, row) in enumerate(zip(seqs, emitted)):
            for j, token in enumerate(row):
                if s.finish_reason is not None:
                    break
                s.cached += 1
                kept[i] += 1
                # each token at its share of the burst, for the inter-token latency histogram
                self._append([s], [token], None, now=started + seconds * (j + 1) / len(row), emit=False)
            if s.finish_reason is None:
                self._emit(s)
        # A row is charged the steps it needed for the tokens it kept (about: its steps emitted 1 to k + 1 each),
        # each step's time shared among the rows it served, as in _decode_ahead; every step fed k + 1 per row.
        needed = [math.ceil(forwards * n / len(row)) for n, row in zip(kept, emitted)]
        for step in range(max(needed)):
            live = [i for i in range(len(seqs)) if needed[i] > step]
            self._account([seqs[i] for i in live], [k + 1] * len(live), seconds / forwards,
                          keys=[positions[i] + step * len(emitted[i]) // forwards for i in live])
        self.metrics.speculated.labels("drafted").inc(k * sum(needed))
        self.metrics.speculated.labels("accepted").inc(sum(n - steps for n, steps in zip(kept, needed)))

    def _speculate_eagerly(self, tokens: list[int], positions: list[int], histories: list[list[int]],
                           to_go: list[int], forwards: int) -> tuple[list[list[int]], int]:
        """Speculative steps for rows 0..B-1 without graphs (a CPU), stopping once every row has emitted to_go[i]
        tokens, as many as its sequence may still produce: each row's emitted tokens, and the steps taken."""
        B, k = len(tokens), self.config.speculate
        history = torch.zeros(B, self.context_len + 1, dtype=torch.long)
        for i, h in enumerate(histories):
            history[i, : len(h)] = torch.tensor(h)
        history, tokens, positions, to_go = (t.to(self.device) for t in (
            history, torch.tensor(tokens), torch.tensor(positions), torch.tensor(to_go)))
        out = torch.zeros(B, self.config.decode_steps * (k + 1), dtype=torch.long, device=self.device)  # one shape
        count = torch.zeros(B, dtype=torch.long, device=self.device)
        view = static_dims(self.cache.rows(0, B))
        for step in range(forwards):
            view.attend_len = max(2, int(positions.max()))  # every row's cached positions
            advance = self._verify(self.model, tokens, positions, history, out, count, view, self.vocab, k)
            view.commit(positions)
            positions += advance
            if bool((count >= to_go).all()):
                break
        counts = count.tolist()
        return [row[:n] for row, n in zip(out.tolist(), counts)], step + 1

    def _decode_ahead(self, steps: int) -> None:
        """`steps` greedy tokens for every running sequence (see _decode)."""
        started = time.monotonic()
        seqs = self._running
        if self.decode_graphs is not None:
            ahead = self.decode_graphs.ahead([s.last_token for s in seqs], [s.cached for s in seqs])
        else:
            idx, positions, view = self._eager_inputs(seqs)
            furthest = max(s.cached for s in seqs)
            tokens = []
            for k in range(steps):
                idx = self._eager_step(idx, positions, view, furthest + k).float().argmax(dim=-1, keepdim=True)
                tokens.append(idx[:, 0])
                positions = positions + 1
            ahead = torch.stack(tokens).tolist()
        ended = time.monotonic()
        seconds = ended - started
        for k, tokens in enumerate(ahead):
            live = [i for i, s in enumerate(seqs) if s.finish_reason is None]
            if not live:
                break
            fed = [seqs[i] for i in live]
            for s in fed:
                s.cached += 1
            self._account(fed, [1] * len(fed), seconds / len(ahead))
            # each token timed at its share of the burst, for the inter-token latency histogram
            now = started + (ended - started) * (k + 1) / len(ahead)
            self._append(fed, [tokens[i] for i in live], None, now=now, emit=k == len(ahead) - 1)

    def _power(self, restart: bool = False) -> float:
        """Watts of the device while busy: the energy counter's average over the last window of >= 0.1 s.

        Reading the counter every step would cost more than a small model's step (an NVML read takes
        milliseconds), so steps are charged this average power times their duration. restart=True (on waking
        from idle) starts a new window, so idle time never dilutes the busy power.
        """
        now = time.monotonic()
        if restart or now - self._window_start >= POWER_WINDOW_S:
            self._energy.sample()
            joules = self._energy.joules()
            if not restart and now > self._window_start:
                self._watts = (joules - self._window_joules) / (now - self._window_start)
            self._window_start, self._window_joules = now, joules
        return self._watts

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor, argmax: torch.Tensor | None = None) -> list[int]:
        """One token per sequence from its row of logits (B, V), with its own penalties, settings and RNG.

        argmax: the logits' argmax (B,) where the step computed it already (the decode graphs)."""
        adjusted = logits
        if any(s.counts is not None for s in seqs):
            adjusted = logits.clone()
            for i, s in enumerate(seqs):
                if s.counts is not None:
                    p = s.request.params
                    adjusted[i] -= p.frequency_penalty * s.counts + p.presence_penalty * (s.counts > 0)
        greedy = [i for i, s in enumerate(seqs) if s.request.params.temperature < GREEDY_BELOW]
        tokens = [0] * len(seqs)
        if greedy:
            if argmax is not None and adjusted is logits:  # no penalties: the step's own argmax
                every = argmax.tolist()
                chosen = [every[i] for i in greedy]
            else:
                chosen = adjusted[greedy].argmax(dim=-1).tolist()
            for i, t in zip(greedy, chosen):
                tokens[i] = t
        for i, s in enumerate(seqs):
            p = s.request.params
            if p.temperature < GREEDY_BELOW:
                continue
            tokens[i] = int(sample_next(adjusted[i : i + 1], temperature=p.temperature, top_k=p.top_k or None,
                                        top_p=p.top_p if p.top_p < 1 else None, generator=s.generator))
        return tokens

    def _append(self, seqs: list[Sequence], tokens: list[int], logits: torch.Tensor | None, *,
                now: float | None = None, emit: bool = True) -> None:
        """Record each sequence's new token: logprobs, penalties, text, stop conditions, events.

        logits: the step's (B, V), which only log-probabilities and penalties read (None where none is asked for).
        emit=False (inside a burst of greedy steps) holds the text back unless the sequence finished or has stop
        strings to look for."""
        want_logprobs = [i for i, s in enumerate(seqs) if s.request.params.logprobs is not None]
        logprobs = logits[want_logprobs].log_softmax(dim=-1) if want_logprobs else None
        now = time.monotonic() if now is None else now
        for i, (s, token) in enumerate(zip(seqs, tokens)):
            p, request = s.request.params, s.request
            if request.first_token is None:
                request.first_token = now
                self.metrics.ttft.observe(now - request.arrived)
            elif s.last_emit:
                self.metrics.itl.observe(now - s.last_emit)
            s.last_emit = now
            request.completion_tokens += 1
            s.last_token = token
            if p.presence_penalty or p.frequency_penalty:
                if s.counts is None:
                    s.counts = torch.zeros(logits.size(-1), device=logits.device)
                s.counts[token] += 1
            if p.max_tokens == 0:  # echo only: the prompt was scored, nothing is generated
                request.completion_tokens -= 1
                s.finish_reason = "length"
            elif token == self.eos_id and not p.ignore_eos or token in p.stop_token_ids:
                s.finish_reason = "stop"  # the stop token itself is neither text nor a returned token
            else:
                s.out_ids.append(token)
                s.text += s.decoder.push(token)
                s.token_ends.append(len(s.text))
                if logprobs is not None and p.logprobs is not None:
                    s.logprobs.append(self._token_logprob(logprobs[want_logprobs.index(i)], token, p.logprobs))
                if p.max_tokens is not None and len(s.out_ids) >= p.max_tokens or s.cached + 1 >= self.context_len:
                    s.finish_reason = "length"
            if emit or s.finish_reason is not None or p.stop:
                self._emit(s)
        self.metrics.completion_tokens.inc(sum(1 for s in seqs if s.request.params.max_tokens != 0))

    def _emit(self, s: Sequence) -> None:
        """Send the sequence's new text: all of it at the end, else all but what may start a stop string."""
        cut = None
        if s.request.params.stop:
            first = min((s.text.find(stop) for stop in s.request.params.stop if stop in s.text), default=-1)
            if first >= 0:
                cut, s.finish_reason = first, "stop"
        if s.finish_reason is not None:
            if cut is None:
                s.text += s.decoder.flush()
                cut = len(s.text)
            # the tokens that start before the cut (a token straddling a stop string is returned, its text cut)
            end_token = sum(1 for j in range(len(s.token_ends)) if (s.token_ends[j - 1] if j else 0) < cut)
            end_token = max(end_token, s.sent_tokens)
        else:
            hold = max((k for stop in s.request.params.stop for k in range(1, len(stop))
                        if s.text.endswith(stop[:k])), default=0)
            safe = len(s.text) - hold
            end_token = s.sent_tokens
            while end_token < len(s.token_ends) and s.token_ends[end_token] <= safe:
                end_token += 1
            cut = s.token_ends[end_token - 1] if end_token else 0
        start_char = s.token_ends[s.sent_tokens - 1] if s.sent_tokens else 0
        if s.rail is not None and s.finish_reason is None:  # chunks end at a token before the unfinished word
            if cut - start_char < s.rail.chunk_chars:  # not a chunk yet (the common case: no scan per token)
                return
            ready = s.rail.ready(s.text, start_char, cut)
            while end_token > s.sent_tokens and s.token_ends[end_token - 1] > ready:
                end_token -= 1
            cut = s.token_ends[end_token - 1] if end_token else 0
        if end_token == s.sent_tokens and s.finish_reason is None:
            return
        cut = max(cut, start_char)
        text = s.text[start_char:cut]
        ids = s.out_ids[s.sent_tokens:end_token]
        lps = s.logprobs[s.sent_tokens:end_token] if s.request.params.logprobs is not None else None
        if s.rail is not None:
            released = s.rail.release(s.text, start_char, cut, final=s.finish_reason is not None)
            if released is None:  # too little new text to check yet: it waits for more
                return
            self._count_guard("output", released.action, released.findings, released.seconds)
            self._audit_rows.extend(audit_rows("output", released.findings, released.window, s.request.id,
                                               self.guard.policy.store_text))
            text = released.text
            if released.blocked:  # what was not sent never will be: the refusal ends the choice
                s.finish_reason, text, ids = "content_filter", self.guard.policy.refusal, []
                lps = [] if lps is not None else None
                s.request.filtered = True
        s.sent_tokens = max(end_token, s.sent_tokens)
        verdict = s.rail.verdict() if s.rail is not None and s.finish_reason is not None else None
        self._send(s.request, Delta(s.index, text, ids, lps, s.finish_reason, verdict))

    def _token_logprob(self, logprobs: torch.Tensor, token: int, top: int) -> TokenLogprob:
        values, ids = logprobs.topk(top) if top else (torch.empty(0), torch.empty(0, dtype=torch.long))
        return TokenLogprob(token, self._token_text[token], float(logprobs[token]),
                            [(j, self._token_text[j], v) for j, v in zip(ids.tolist(), values.tolist())])

    def _prompt_logprobs(self, request: Request, full_logits: torch.Tensor) -> list[TokenLogprob]:
        ids = request.prompt_ids
        logprobs = full_logits[: len(ids) - 1].log_softmax(dim=-1)  # position t predicts token t + 1
        top = request.params.logprobs or 0
        out = [TokenLogprob(ids[0], self._token_text[ids[0]], None)]
        out += [self._token_logprob(logprobs[t], ids[t + 1], top) for t in range(len(ids) - 1)]
        return out

    def _account(self, seqs: list[Sequence], fed: list[int], seconds: float, keys: list[int] | None = None) -> None:
        """Share one forward pass's time and energy among its sequences by tokens fed; count FLOPs per token.

        keys: the cached positions each sequence's tokens attend to, where they are decoded several at a time
        (speculation); otherwise a prompt of n tokens counts n x n, and a decoded token its position."""
        energy = self._power() * seconds
        total = sum(fed)
        flops = 0.0
        for i, (s, n) in enumerate(zip(seqs, fed)):
            share = n / total
            r = s.request
            r.device_seconds += seconds * share
            r.energy_j += energy * share
            # a prompt counts a full n x n attention (PaLM's convention, as in training); a decoded token attends
            # to its position's worth of keys
            attended = keys[i] if keys is not None else n if n > 1 else s.cached
            f = n * (self._flops_base + self._flops_per_key * attended)
            r.flops += f
            flops += f
        self.metrics.flops.inc(flops)
        self.metrics.device_seconds.inc(seconds)
        self.metrics.energy.labels("measured" if self.energy_measured else "estimate").inc(max(energy, 0.0))
        self.metrics.running.set(len(self._running))

    def _retire(self) -> None:
        """Take finished sequences out; the last running row moves into each hole (KV rows copied)."""
        row = 0
        while row < len(self._running):
            s = self._running[row]
            if s.finish_reason is None:
                row += 1
                continue
            last = len(self._running) - 1
            if row != last:
                self.cache.k[:, row] = self.cache.k[:, last]
                self.cache.v[:, row] = self.cache.v[:, last]
                self._running[row] = self._running[last]
            self._running.pop()
            self._close_choice(s)
        self.metrics.running.set(len(self._running))

    def _close_choice(self, s: Sequence) -> None:
        r = s.request
        r.open_choices -= 1
        if r.open_choices:
            return
        if r.cancelled:
            self.metrics.cancelled.inc()
        now = time.monotonic()
        self.metrics.latency.observe(now - r.arrived)
        self._record(r, "cancelled" if r.cancelled else "blocked:output" if r.filtered else "completed")
        self._send(r, Finished(self._usage(r, now)))

    def _usage(self, r: Request, now: float) -> Usage:
        return Usage(len(r.prompt_ids), r.completion_tokens, r.flops, r.device_seconds, r.energy_j,
                     self.energy_measured, (r.admitted or now) - r.arrived,
                     None if r.first_token is None else r.first_token - r.arrived)

    def _record(self, r: Request, status: str) -> None:
        """A ledger row for a request that ended (written in batches by _flush_ledger)."""
        self._finished_rows.append(dict(created_at=time.time(), model=self.model_id,
                                        prompt_tokens=len(r.prompt_ids), completion_tokens=r.completion_tokens,
                                        flops=r.flops, device_seconds=r.device_seconds, energy_j=r.energy_j,
                                        status=status))

    def _fail(self, request: Request, status: int, message: str, code: str | None = None) -> None:
        self._record(request, f"failed:{status}")
        self._send(request, Failed(status, message, code))

    def _send(self, request: Request, event: Event) -> None:
        self._outbox.append((request, event))

    def _deliver(self) -> None:
        """Hand this step's events to their callers: one wake-up per event loop per step, not one per token."""
        if self.forward_events is not None:
            self.forward_events([(request.id, event) for request, event in self._outbox])
            self._outbox.clear()
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestHandle, Event]]] = {}
        for request, event in self._outbox:
            handle = request.handle
            if handle._loop is None:
                handle._put(event)
            else:
                by_loop.setdefault(handle._loop, []).append((handle, event))
        self._outbox.clear()
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that loop is closed: nobody is listening any more
                for handle, _ in items:
                    handle._request.cancelled = True

    def _flush_ledger_if_due(self) -> None:
        now = time.monotonic()
        if self._finished_rows and (len(self._finished_rows) >= 64 or now - self._flushed > 1.0):
            self._flush_ledger()

    def _flush_ledger(self) -> None:
        """Write the waiting rows; they leave the queues only once written (Ctrl-C may land mid-write)."""
        self._flushed = time.monotonic()
        for pending, write in ((self._finished_rows, self.ledger and self.ledger.log_requests),
                               (self._audit_rows, self.ledger and self.ledger.log_guard_events)):
            rows = list(pending)  # other threads only append: this snapshot is the oldest len(rows)
            if rows and write:
                write(self.run_id, rows)
            for _ in rows:
                pending.popleft()
