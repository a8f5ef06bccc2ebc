"""Serving latency and throughput of the lmforge server against Hugging Face transformers `generate`, same weights.

Starts `lmforge serve` on a checkpoint as a subprocess and drives it over HTTP with greedy streaming completions
(OpenAI /v1/completions, SSE), every request asking for exactly --max-tokens new tokens (ignore_eos):
  batch 1: --repeats requests, one at a time;
  concurrent: --concurrency clients (asyncio + httpx) that send --back-to-back requests each, the next as soon as
  one ends, so that --concurrency requests are in flight until the last ones end; continuous batching does the rest.
  On a GPU these clients run in --client-processes processes (default 4): one tops out below the request rate that
  5x HF means there.
HF LlamaForCausalLM / Qwen3ForCausalLM holding the same weights (renamed 1:1; its logits are checked against ours
first) runs `generate` in this process on the same prompts, at batch 1 and at batch --concurrency, in the same
dtype (fp32 on CPU, bf16 on CUDA). Both use torch's default thread count. With --engine, the engine is also timed
called in-process (no HTTP), which shows what the HTTP layer costs.

After a warm-up of each, the measurements run in --rounds rounds, each round every row in turn, so that load from
other processes on a shared machine falls on all of them alike; the server idles while HF runs, and nothing of
HF's runs while the server works. TTFT is request sent -> first token's text received (HF: generate called ->
first token out of the streamer hook), ITL the gaps between text chunks after that (with --decode-steps K, a chunk
holds up to K tokens), both pooled over the rounds.
tok/s and req/s are medians over the rounds: tok/s is the decode rate in the batch-1 rows (tokens after the first
/ time after the first) and all output tokens / wall time in the concurrent rows; "vs HF" compares tok/s with
the HF row of the same batch. The targets: batch-1 decode >= 2x HF and 32-concurrent output >= 3x HF batch-32 on a
CPU, >= 50x and >= 5x on a GPU. The lmforge numbers include HTTP, JSON and the client (in this process,
or in --client-processes processes). Last, the CPU time the server's processes used in the concurrent rows, per
request and as a share of one core: the HTTP process, and the engine process where it has one.

    python bench/serve_bench.py --ckpt RUN|PATH                     # 32 concurrent, 32-token prompts, 64 new tokens
    python bench/serve_bench.py --ckpt RUN --concurrency 8 --max-tokens 128 --engine
    python bench/serve_bench.py --ckpt RUN --device cuda
    python bench/serve_bench.py --ckpt RUN --device cuda --cuda-graphs off   # the decode step launched eagerly
    python bench/serve_bench.py --ckpt RUN --decode-steps 4                  # 4 greedy tokens per scheduler step
"""

import argparse
import asyncio
import itertools
import json
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable
from dataclasses import astuple, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

import httpx
import torch
from train_throughput import cpu_name, hf_model
from transformers.generation.streamers import BaseStreamer

from lmforge.checkpoint import load_model, resolve_checkpoint
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import LmforgeError
from lmforge.model.sizing import describe
from lmforge.model.transformer import Transformer
from lmforge.serve.engine import (
    Delta,
    Engine,
    EngineConfig,
    Failed,
    Finished,
    SamplingParams,
)
from lmforge.workspace import Workspace

# the targets, as multiples of HF: (batch-1 decode tok/s, output tok/s at 32 concurrent vs HF batch 32)
TARGETS = {"cpu": (2.0, 3.0), "cuda": (50.0, 5.0)}
PROMPT_SOURCE = Path(argparse.__file__)  # a long, known text on every machine: prompts are windows of its tokens
SERVER_START_TIMEOUT = 180.0  # seconds for `lmforge serve` to load the checkpoint and answer /health
WARMUP_TOKENS = 8  # new tokens per request in the concurrent warm-up


@dataclass
class Timing:
    """One request, or one generate call (its rows share the times): when it started and when each token came."""
    start: float
    token_times: list[float] = field(default_factory=list)
    tokens: int = 0  # output tokens (of all rows, for a batched generate)
    text: str = ""  # the (first row's) output text
    engine_ttft: float | None = None  # lmforge: the engine's TTFT (from usage), from submission to it, queue included

    @property
    def end(self) -> float:
        return self.token_times[-1]

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.start

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


@dataclass
class Row:
    """One line of the table: every round's timings, and each round's tok/s and req/s."""
    label: str
    timings: list[Timing] = field(default_factory=list)
    tok_s: list[float] = field(default_factory=list)
    req_s: list[float] = field(default_factory=list)

    def add_sequential(self, timings: list[Timing]) -> None:
        """Requests run one after another: decode rate (tokens after the first / time after the first)."""
        self.timings += timings
        self.tok_s.append(sum(t.tokens - 1 for t in timings) / sum(t.end - t.token_times[0] for t in timings))
        self.req_s.append(len(timings) / sum(t.end - t.start for t in timings))

    def add_together(self, timings: list[Timing], requests: int) -> None:
        """Requests run at the same time: all output tokens / wall time."""
        self.timings += timings
        wall = max(t.end for t in timings) - min(t.start for t in timings)
        self.tok_s.append(sum(t.tokens for t in timings) / wall)
        self.req_s.append(requests / wall)


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks, as numpy.percentile's default."""
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def make_prompts(tokenizer: Tokenizer, count: int, length: int) -> list[str]:
    """`count` distinct texts of exactly `length` tokens each: consecutive windows of PROMPT_SOURCE's tokens,
    kept only where the window's text encodes back to the same tokens (what the server will see)."""
    ids = tokenizer.encode(PROMPT_SOURCE.read_text())
    prompts, start = [], 0
    while len(prompts) < count and start + length <= len(ids):
        window = ids[start : start + length]
        text = tokenizer.decode(window)
        if tokenizer.encode(text) == window:
            prompts.append(text)
            start += length
        else:
            start += 1
    if len(prompts) < count:
        raise LmforgeError(f"{PROMPT_SOURCE} gives only {len(prompts)} prompts of {length} tokens, {count} needed; "
                           f"lower --prompt-tokens or --concurrency")
    return prompts


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our weights under HF Llama / Qwen3 names (the mapping in lmforge/model/transformer.py's docstring)."""
    renamed = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("blocks."):
            _, layer, rest = name.split(".", 2)
            rest = rest.replace("attn_norm", "input_layernorm").replace("mlp_norm", "post_attention_layernorm")
            name = f"model.layers.{layer}.{rest.replace('attn.', 'self_attn.')}"
        else:
            name = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}.get(name, name)
        renamed[name] = tensor
    return renamed


def hf_twin(model: Transformer, prompt_ids: torch.Tensor) -> tuple[torch.nn.Module, float]:
    """The HF model holding our weights, and the largest logit difference from ours on prompt_ids (B, T)."""
    hf = hf_model(model.shape)
    hf.load_state_dict(hf_state_dict(model))
    hf.eval()
    with torch.inference_mode():
        ours = model(prompt_ids)  # (B, T, V)
        theirs = hf(input_ids=prompt_ids).logits  # (B, T, V)
    diff = float((ours - theirs).abs().max())
    if not torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4):
        raise RuntimeError(f"HF logits differ from ours by up to {diff:.3g} on the same weights; the weight "
                           f"mapping or the HF config is wrong")
    # exactly the requested tokens, as the server with ignore_eos: no end-of-text id to stop at or to suppress
    hf.generation_config.eos_token_id = None
    hf.generation_config.bos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf, diff


# ---- lmforge: the server over HTTP, and the engine in-process -------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`lmforge serve` in a subprocess, its output in a log file shown if it fails; a context manager that always
    stops it (also on errors and Ctrl-C)."""

    def __init__(self, ckpt: Path, port: int, concurrency: int, device: str, options: list[str]):
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="serve_bench-", suffix=".log", delete=False)
        self.workspace = tempfile.TemporaryDirectory(prefix="serve_bench-")  # keeps our requests out of your ledger
        self.command = [sys.executable, "-m", "lmforge", "serve", "--workspace", self.workspace.name,
                        "--ckpt", str(ckpt), "--port", str(port), "--max-concurrency", str(concurrency),
                        "--device", device, *options]
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "Server":
        self.process = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            self._wait_until_healthy()
        except BaseException:  # `with` calls __exit__ only once __enter__ has returned
            self.__exit__()
            raise
        return self

    def _wait_until_healthy(self) -> None:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise LmforgeError(f"the server exited with code {self.process.returncode} while starting: "
                                   f"{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise LmforgeError(f"the server did not answer {self.url}/health within {SERVER_START_TIMEOUT:.0f} s: "
                           f"{self.log_tail()}")

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        os.unlink(self.log.name)
        self.workspace.cleanup()

    def log_tail(self) -> str:
        self.log.flush()
        lines = Path(self.log.name).read_text(errors="replace").strip().splitlines()
        return " | ".join(lines[-5:]) or "(no output)"

    def start_up(self) -> str:
        """What the server said before it was ready: what it compiled or captured and how long that took, and any
        warning (a prefill that did not compile, say)."""
        self.log.flush()
        lines = Path(self.log.name).read_text(errors="replace").splitlines()
        return " | ".join(line.strip() for line in itertools.takewhile(lambda line: not line.startswith("serving "),
                                                                       lines) if line.strip()) or "(nothing)"

    def model_id(self) -> str:
        return httpx.get(f"{self.url}/v1/models", timeout=10.0).json()["data"][0]["id"]


def process_tree_cpu(root: int) -> dict[int, float]:
    """CPU seconds (user + system) so far of process `root` and of its descendants, by pid; from /proc, so empty
    where there is none (not Linux)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    parents, seconds = {}, {}
    for entry in os.scandir("/proc") if os.path.isdir("/proc") else []:
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after the command: state, ppid, ..., utime, stime
        except OSError:  # gone meanwhile
            continue
        pid = int(entry.name)
        parents[pid], seconds[pid] = int(fields[1]), (int(fields[11]) + int(fields[12])) / tick
    tree, frontier = set(), [root]
    while frontier:
        pid = frontier.pop()
        if pid in seconds and pid not in tree:
            tree.add(pid)
            frontier += [child for child, parent in parents.items() if parent == pid]
    return {pid: seconds[pid] for pid in tree}


class ServerCPU:
    """How much CPU the server's processes use over the timed concurrent rows: the HTTP process (the server
    itself), the engine process (its child, with --engine-process on) and the rest (compile workers, ...). One of
    them at 100% of a core is what limits the row."""

    def __init__(self, pid: int):
        self.pid = pid
        self.seconds: dict[str, float] = {}
        self.wall = 0.0
        self.requests = 0

    def label(self, pid: int) -> str:
        if pid == self.pid:
            return "HTTP process"
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                spawned = b"spawn_main" in f.read()
        except OSError:
            spawned = False
        return "engine process" if spawned else "other"

    async def measure(self, work: Awaitable[list[Timing]], requests: int) -> list[Timing]:
        """Await `work` (a concurrent row's `requests` requests), counting the CPU the server used meanwhile."""
        before, start = process_tree_cpu(self.pid), time.monotonic()
        timings = await work
        after, self.wall = process_tree_cpu(self.pid), self.wall + time.monotonic() - start
        self.requests += requests
        for pid, seconds in after.items():
            label = self.label(pid)
            self.seconds[label] = self.seconds.get(label, 0.0) + seconds - before.get(pid, 0.0)
        return timings

    def summary(self) -> str:
        if not self.seconds or not self.requests:
            return "server CPU: not measured (no /proc)"
        parts = [f"{label} {seconds / self.requests * 1e3:.2f} ms per request ({seconds / self.wall:.0%} of a core)"
                 for label, seconds in sorted(self.seconds.items(), key=lambda kv: -kv[1]) if seconds > 0]
        return "server CPU in the concurrent rows: " + ", ".join(parts)


def check_tokens(timing: Timing, max_tokens: int) -> Timing:
    if timing.tokens != max_tokens or not timing.token_times:
        raise LmforgeError(f"lmforge returned {timing.tokens} tokens where {max_tokens} were asked for with "
                           f"ignore_eos; the benchmark needs every request to run to max_tokens")
    return timing


class HTTPClient:
    """Greedy streaming completions against the server, each request on a connection of its own.

    One httpx client per request in flight, each keeping its one connection alive, like that many separate users:
    a single client's pool of 32 connections costs the client more CPU than its requests do (httpcore walks the
    whole pool at every request start and end), CPU that the server on the same 2 cores then lacks."""

    def __init__(self, url: str, model: str, connections: int):
        self.model = model
        # verify=False: plain HTTP to this machine, so skip loading the CA bundle once per client
        self.clients = [httpx.AsyncClient(base_url=url, timeout=None, verify=False) for _ in range(connections)]
        self.idle: asyncio.Queue[httpx.AsyncClient] = asyncio.Queue()
        for client in self.clients:
            self.idle.put_nowait(client)

    async def close(self) -> None:
        for client in self.clients:
            await client.aclose()

    async def complete(self, prompt: str, max_tokens: int) -> Timing:
        client = await self.idle.get()
        try:
            return await self._complete(client, prompt, max_tokens)
        finally:
            self.idle.put_nowait(client)

    async def _complete(self, client: httpx.AsyncClient, prompt: str, max_tokens: int) -> Timing:
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "ignore_eos": True, "stream_options": {"include_usage": True}}
        timing = Timing(time.perf_counter())
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                raise LmforgeError(f"the server answered {response.status_code}: {(await response.aread()).decode()}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    raise LmforgeError(f"the server failed the request mid-stream: {chunk['error']['message']}")
                text = chunk["choices"][0]["text"] if chunk.get("choices") else ""
                if text:  # a chunk is one token, or a few where a token ended inside a UTF-8 character
                    timing.token_times.append(time.perf_counter())
                    timing.text += text
                if chunk.get("usage"):
                    timing.tokens = chunk["usage"]["completion_tokens"]
                    timing.engine_ttft = chunk["usage"]["lmforge"]["time_to_first_token"]
        return check_tokens(timing, max_tokens)


class EngineClient:
    """The same requests, submitted to an Engine in this process: no HTTP, no JSON."""

    def __init__(self, engine: Engine):
        self.engine = engine

    async def complete(self, prompt: str, max_tokens: int) -> Timing:
        timing = Timing(time.perf_counter())
        handle = self.engine.submit(prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
        async for event in handle:
            if isinstance(event, Delta) and event.token_ids:
                timing.token_times.append(time.perf_counter())
                timing.text += event.text
            elif isinstance(event, Finished):
                timing.tokens = event.usage.completion_tokens
                timing.engine_ttft = event.usage.time_to_first_token
            elif isinstance(event, Failed):
                raise LmforgeError(f"the engine failed a request ({event.status}): {event.message}")
        return check_tokens(timing, max_tokens)


async def one_at_a_time(client: HTTPClient | EngineClient, prompts: list[str], max_tokens: int) -> list[Timing]:
    return [await client.complete(p, max_tokens) for p in prompts]


async def all_at_once(client: HTTPClient | EngineClient, prompts: list[str], max_tokens: int,
                      back_to_back: int = 1) -> list[Timing]:
    """One request per prompt at once; with back_to_back > 1, each then sends its next as soon as one ends (a
    closed loop that keeps len(prompts) requests in flight, as serving benchmarks run a concurrency level)."""
    async def client_loop(prompt: str) -> list[Timing]:
        return [await client.complete(prompt, max_tokens) for _ in range(back_to_back)]
    return [t for ts in await asyncio.gather(*(client_loop(p) for p in prompts)) for t in ts]


class ClientProcesses:
    """The concurrent rows' clients spread over several processes, each an asyncio loop with httpx and its share of
    the connections. One such process needs 1.1-1.6 ms of CPU per streamed request (measured on the CPU machine),
    so it tops out near 600-900 requests/s: below the 550-1,000 requests/s that 5x HF's batch-32 rate means on a
    GPU. Each process's timings are taken with time.perf_counter, a system-wide monotonic clock on Linux, so one
    wall time spans them all."""

    def __init__(self, url: str, model: str, connections: int, processes: int):
        spawn = multiprocessing.get_context("spawn")  # no fork of a process that holds torch's threads
        self.pipes: list[Connection] = []
        self.processes = []
        for i in range(processes):
            ours, theirs = spawn.Pipe()
            share = connections // processes + (i < connections % processes)
            process = spawn.Process(target=client_process, args=(theirs, url, model, share), daemon=True)
            process.start()
            theirs.close()  # the child's end lives in the child: its exit then reads as EOF here
            self.pipes.append(ours)
            self.processes.append(process)

    async def all_at_once(self, prompts: list[str], max_tokens: int, back_to_back: int = 1) -> list[Timing]:
        """As all_at_once: prompt i goes to process i mod P, and all processes start together."""
        P = len(self.pipes)
        for i, pipe in enumerate(self.pipes):
            pipe.send((prompts[i::P], max_tokens, back_to_back))
        timings = []
        for i, pipe in enumerate(self.pipes):
            try:
                result = await asyncio.to_thread(pipe.recv)
            except EOFError:
                raise LmforgeError(f"client process {i} exited (exit code {self.processes[i].exitcode}); its "
                                   f"error is above") from None
            if isinstance(result, str):
                raise LmforgeError(f"client process {i}: {result}")
            timings += [Timing(*fields) for fields in result]
        return timings

    async def close(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send(None)
            except OSError:  # that process has gone already
                pass
        for process in self.processes:
            await asyncio.to_thread(process.join, 10)
            if process.is_alive():
                process.terminate()


def client_process(pipe: Connection, url: str, model: str, connections: int) -> None:
    """A ClientProcesses worker: runs each job (prompts, max_tokens, back_to_back) it is sent, answering with plain
    tuples (a class pickled in a spawned process names a module its parent lacks) or a one-line error."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the children

    async def jobs() -> None:
        client = HTTPClient(url, model, connections)
        try:
            while (job := pipe.recv()) is not None:
                try:
                    timings = await all_at_once(client, *job)
                    pipe.send([astuple(t) for t in timings])
                except Exception as e:  # a refused or dropped connection, an error from the server
                    pipe.send(f"{type(e).__name__}: {e}")
        finally:
            await client.close()
    asyncio.run(jobs())


# ---- Hugging Face generate -----------------------------------------------------------------------------------

class TokenClock(BaseStreamer):
    """A generate() streamer that only notes the time: put() gets the prompt once, then each step's new tokens."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_generate(hf: torch.nn.Module, ids: torch.Tensor, max_tokens: int, tokenizer: Tokenizer) -> Timing:
    """One greedy generate of exactly max_tokens new tokens for every row of ids (B, T), timed per step."""
    clock = TokenClock(ids.device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                          min_new_tokens=max_tokens, do_sample=False, use_cache=True, streamer=clock)  # (B, T + M)
    new = out[:, ids.size(1):]  # (B, M)
    return Timing(start, clock.times[1:], new.numel(), tokenizer.decode(new[0].tolist()))


# ---- the run -------------------------------------------------------------------------------------------------

async def measure(args: argparse.Namespace, server: Server, engine: Engine | None, hf: torch.nn.Module,
                  prompts: list[str], prompt_ids: torch.Tensor, tokenizer: Tokenizer,
                  server_cpu: ServerCPU) -> list[Row]:
    """Warm up every implementation, then --rounds rounds of every row in turn. Rows: lmforge batch 1, HF batch 1,
    lmforge concurrent, HF batch C, then (with an engine) the engine's batch 1 and concurrent."""
    C, M = args.concurrency, args.max_tokens
    single = prompts[: args.repeats]
    rows = [Row("lmforge batch 1"), Row("HF generate batch 1"), Row(f"lmforge {C} concurrent"),
            Row(f"HF generate batch {C}")]
    if engine is not None:
        rows += [Row("engine batch 1 (no HTTP)"), Row(f"engine {C} concurrent (no HTTP)")]
    clients = [HTTPClient(server.url, server.model_id(), C)] + ([EngineClient(engine)] if engine else [])
    spread: ClientProcesses | None = None

    async def concurrent_http(max_tokens: int, back_to_back: int = 1) -> list[Timing]:
        if spread is not None:
            return await spread.all_at_once(prompts, max_tokens, back_to_back)
        return await all_at_once(clients[0], prompts, max_tokens, back_to_back)

    try:
        if args.client_processes > 1:
            spread = ClientProcesses(server.url, server.model_id(), C, args.client_processes)
        await one_at_a_time(clients[0], single[:1], M)
        await concurrent_http(min(M, WARMUP_TOKENS))
        for client in clients[1:]:
            await one_at_a_time(client, single[:1], M)
            await all_at_once(client, prompts, min(M, WARMUP_TOKENS))
        hf_generate(hf, prompt_ids[:1], M, tokenizer)
        hf_generate(hf, prompt_ids, min(M, WARMUP_TOKENS), tokenizer)
        progress("warmed up")

        for r in range(args.rounds):
            rows[0].add_sequential(await one_at_a_time(clients[0], single, M))
            rows[1].add_sequential([hf_generate(hf, prompt_ids[i : i + 1], M, tokenizer) for i in range(len(single))])
            rows[2].add_together(await server_cpu.measure(concurrent_http(M, args.back_to_back),
                                                          C * args.back_to_back), C * args.back_to_back)
            rows[3].add_together([hf_generate(hf, prompt_ids, M, tokenizer)], C)
            if engine is not None:
                rows[4].add_sequential(await one_at_a_time(clients[1], single, M))
                rows[5].add_together(await all_at_once(clients[1], prompts, M, args.back_to_back),
                                     C * args.back_to_back)
            progress(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{row.label} {row.tok_s[-1]:.0f} tok/s"
                                                                   for row in rows))
    finally:
        await clients[0].close()
        if spread is not None:
            await spread.close()
    return rows


def progress(message: str) -> None:
    """A line on stderr while the benchmark runs, so that a run cut short still says how far it got."""
    print(f"serve_bench: {message}", file=sys.stderr, flush=True)


def print_table(rows: list[Row], hf_rows: list[Row | None]) -> None:
    """One line per row; hf_rows[i] is the HF row that rows[i] is compared with (None: no comparison)."""
    print(f"\n{'':<34} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} {'req/s':>7} {'tok/s':>8} "
          f"{'vs HF':>6}")
    for row, hf_row in zip(rows, hf_rows):
        ttfts = [t.ttft * 1e3 for t in row.timings]
        itls = [gap * 1e3 for t in row.timings for gap in t.itls]
        tok_s = statistics.median(row.tok_s)
        ratio = f"{tok_s / statistics.median(hf_row.tok_s):.2f}x" if hf_row else ""
        print(f"{row.label:<34} {percentile(ttfts, 50):>7.1f}ms {percentile(ttfts, 99):>7.1f}ms "
              f"{percentile(itls, 50):>6.2f}ms {percentile(itls, 99):>6.2f}ms {statistics.median(row.req_s):>7.2f} "
              f"{tok_s:>8.0f} {ratio:>6}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", metavar="RUN|PATH", help="run name, run folder or checkpoint folder")
    parser.add_argument("--workspace", metavar="DIR", help="where run names are looked up (default: $LMFORGE_HOME, "
                        "else ./lmforge-work)")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight together, and HF's batch")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="prompt length in tokens")
    parser.add_argument("--repeats", type=int, default=3, help="requests per round in the batch-1 rows")
    parser.add_argument("--back-to-back", type=int, default=4, metavar="R",
                        help="requests each of the --concurrency clients sends in turn per round in the concurrent "
                        "rows, the next as soon as one ends (default 4; 1 = one wave sent at once)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of every row")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--port", type=int, default=0, help="the server's port (default: a free one)")
    parser.add_argument("--engine", action="store_true", help="also time the engine in-process, without HTTP")
    parser.add_argument("--cuda-graphs", choices=["on", "off"], default="on",
                        help="lmforge's decode step as CUDA graphs on a GPU (as `lmforge serve --cuda-graphs`)")
    parser.add_argument("--compile", choices=["on", "off"], default="on",
                        help="torch.compile lmforge's decode step (as `lmforge serve --compile`)")
    parser.add_argument("--engine-process", choices=["auto", "on", "off"], default="auto",
                        help="lmforge's engine in a process of its own (as `lmforge serve --engine-process`)")
    parser.add_argument("--decode-steps", type=int, default=16, metavar="K",
                        help="greedy tokens per scheduler step (as `lmforge serve --decode-steps`)")
    parser.add_argument("--speculate", type=int, default=4, metavar="K",
                        help="tokens drafted per step by prompt lookup (as `lmforge serve --speculate`; 0 = off)")
    parser.add_argument("--speculate-max-batch", type=int, default=0, metavar="N",
                        help="speculate while at most N sequences run (as `lmforge serve --speculate-max-batch`)")
    parser.add_argument("--client-processes", type=int, metavar="P",
                        help="processes the concurrent rows' HTTP clients are spread over (default: 1 on a CPU, "
                        "where they share its cores with the server; on a GPU 4, as one tops out below the "
                        "request rate 5x HF means)")
    args = parser.parse_args()
    if args.client_processes is None:
        args.client_processes = min(4, args.concurrency) if args.device == "cuda" else 1
    if args.ckpt is None:
        raise LmforgeError("no checkpoint: pass --ckpt RUN|PATH; `make demo` trains one into "
                           "lmforge-work/runs/stdlib-d2-<date>-<time>")
    for name in ("concurrency", "max_tokens", "prompt_tokens", "repeats", "rounds", "back_to_back",
                 "client_processes"):
        if getattr(args, name) < 1:
            raise LmforgeError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.client_processes > args.concurrency:
        raise LmforgeError(f"--client-processes {args.client_processes} exceeds --concurrency {args.concurrency}; "
                           f"each process needs at least one of the concurrent requests")
    if args.repeats > args.concurrency:
        raise LmforgeError(f"--repeats {args.repeats} exceeds --concurrency {args.concurrency}, which sets how many "
                           f"prompts there are; lower --repeats")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise LmforgeError("--device cuda but torch sees no CUDA device; use --device cpu")

    ckpt = resolve_checkpoint(args.ckpt, Workspace.resolve(args.workspace).runs_dir).absolute()
    loaded = load_model(ckpt, "cpu")
    shape, tokenizer = loaded.model.shape, loaded.tokenizer
    if args.prompt_tokens + args.max_tokens > shape.max_seq_len:
        raise LmforgeError(f"--prompt-tokens {args.prompt_tokens} + --max-tokens {args.max_tokens} exceeds the "
                           f"model's context of {shape.max_seq_len}; lower one of them")
    prompts = make_prompts(tokenizer, args.concurrency, args.prompt_tokens)
    prompt_ids = torch.tensor([tokenizer.encode(p) for p in prompts])  # (C, P)
    hf, logit_diff = hf_twin(loaded.model, prompt_ids[:4])
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # what the engine runs in
    hf.to(device, dtype)

    del loaded  # the server and the engine load their own copies
    compile_on = args.compile == "on"
    steps = args.decode_steps
    engine = None
    if args.engine:
        engine = Engine.from_checkpoint(ckpt, EngineConfig(max_concurrency=args.concurrency, device=args.device,
                                                           compile=compile_on, cuda_graphs=args.cuda_graphs == "on",
                                                           decode_steps=steps, speculate=args.speculate,
                                                           speculate_max_batch=args.speculate_max_batch))
        engine.warm_up()
        engine.start()
        progress("the in-process engine is ready")
    try:
        options = ["--cuda-graphs", args.cuda_graphs, "--compile", args.compile, "--decode-steps", str(steps),
                   "--engine-process", args.engine_process, "--speculate", str(args.speculate),
                   "--speculate-max-batch", str(args.speculate_max_batch)]
        with Server(ckpt, args.port or free_port(), args.concurrency, args.device, options) as server:
            server_cpu = ServerCPU(server.process.pid)
            start_up = server.start_up()
            progress(f"server ready: {start_up}")
            rows = asyncio.run(measure(args, server, engine, hf, prompts, prompt_ids.to(device), tokenizer,
                                       server_cpu))
    finally:
        if engine is not None:
            engine.stop()

    ours_1, hf_1, ours_c, hf_c = rows[:4]
    same = sum(ours.text == theirs.text for ours, theirs in zip(ours_1.timings, hf_1.timings))
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    graphs = f", CUDA graphs {args.cuda_graphs}" if device.type == "cuda" else ""
    graphs += f", compile {'on' if compile_on else 'off'}, decode steps {steps}, engine process {args.engine_process}"
    graphs += f", speculate {args.speculate} (max batch {args.speculate_max_batch or 'auto'})"
    print(f"machine: {machine}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{'bf16' if dtype == torch.bfloat16 else 'fp32'}{graphs}")
    print(f"model: {describe(shape)}\ncheckpoint: {ckpt}\nserver start-up: {start_up}")
    print(f"{args.concurrency} concurrent ({args.back_to_back} requests each in turn, clients in "
          f"{args.client_processes} process{'es' if args.client_processes > 1 else ''}), prompts of "
          f"{args.prompt_tokens} tokens, {args.max_tokens} new tokens "
          f"(greedy, ignore_eos); batch 1: {args.repeats} requests in turn; {args.rounds} rounds, medians")
    print(f"HF {type(hf).__name__}: logits within {logit_diff:.1e} of ours; greedy text equal to lmforge's on "
          f"{same}/{len(ours_1.timings)} batch-1 requests")
    print_table(rows, [hf_1, None, hf_c, None, hf_1, hf_c][: len(rows)])
    print("tok/s: decode (after the first token) in batch-1 rows, all output tokens / wall time in the others")
    print(server_cpu.summary())
    inside = [f"{row.label} {percentile([t.engine_ttft * 1e3 for t in row.timings], 50):.1f}ms" for row in rows
              if row.timings and all(t.engine_ttft is not None for t in row.timings)]
    print(f"TTFT p50 from the request's submission to the engine (the pipe included, with the engine in a process of "
          f"its own; the rest is HTTP and the client): {', '.join(inside)}")
    target_1, target_c = TARGETS[device.type]
    for what, ours, theirs, target in (("batch-1 decode tok/s", ours_1, hf_1, target_1),
                                       (f"{args.concurrency}-concurrent output tok/s", ours_c, hf_c, target_c)):
        ratio = statistics.median(ours.tok_s) / statistics.median(theirs.tok_s)
        print(f"target: lmforge {what} >= {target:g}x HF: {ratio:.2f}x {'PASS' if ratio >= target else 'MISS'}")


if __name__ == "__main__":
    try:
        main()
    except LmforgeError as e:
        sys.exit(f"serve_bench: {e}")
    except KeyboardInterrupt:  # the server has been stopped on the way out
        sys.exit(130)
