"""`lmforge serve`: an OpenAI-compatible HTTP server for a checkpoint, every request metered in the ledger."""

from __future__ import annotations

import argparse
import math
import re
import signal
import socket
import threading
import time
from pathlib import Path

import uvicorn

from lmforge.checkpoint import read_config, resolve_checkpoint
from lmforge.cli.common import err, human, workspace_of
from lmforge.errors import LmforgeError, UsageError
from lmforge.guard.guard import Guard
from lmforge.guard.policy import DIRECTIONS
from lmforge.meter.energy import footprint
from lmforge.meter.hardware import default_carbon_g_per_kwh, describe_machine
from lmforge.meter.ledger import Ledger
from lmforge.serve.app import create_app
from lmforge.serve.engine import Engine, EngineConfig, start_summary, start_work
from lmforge.serve.engine_process import EngineProcess
from lmforge.train.runtime import resolve_device

HELP = "serve a checkpoint over an OpenAI-compatible HTTP API (completions, chat, streaming)"
DESCRIPTION = """\
Serve a checkpoint at /v1/completions and /v1/chat/completions in OpenAI's format (streaming, n, stop, seed,
logprobs and echo included), with /v1/models, /health and Prometheus /metrics. Requests are batched
continuously over --max-concurrency KV-cache rows; beyond those, up to --max-queue wait, and more get 429.
The server is a 'serve' run in the ledger: each request's tokens, FLOPs, device time and energy are recorded,
and Ctrl-C stops it with a summary. Unknown request fields are ignored and named in the response header
X-Lmforge-Ignored-Params.

--guard POLICY puts guard rails around the model (POLICY = a policy YAML, or 'builtin' for the shipped default;
write your own from `lmforge guard policy`): prompts are checked before they are queued, generated text before
it is sent. Blocked requests and cut-off outputs end with the policy's refusal and finish_reason
"content_filter"; verdicts are in each response's `lmforge.guard` field, counted on /metrics, and every finding
is audited in the ledger (a sha256 of the text, not the text, unless the policy sets store_text).

examples:
  lmforge serve --ckpt my-run
  lmforge serve --ckpt my-run --host 0.0.0.0 --port 8080 --api-key-file keys.txt
  lmforge serve --ckpt my-run --guard builtin
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"model": "my-run", "prompt": "def fib(n):", "max_tokens": 32, "temperature": 0}'
"""

API_KEY = re.compile(r"[\x21-\x7e]+")  # printable ASCII without spaces: what fits in an Authorization header
GRACEFUL_SHUTDOWN_S = 3  # on Ctrl-C, open streams get this long before they are cut


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, metavar="RUN|PATH", help="run name, run folder or checkpoint folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                   "only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 = any free port)")
    p.add_argument("--api-key-file", metavar="FILE", help="file of API keys, one per line ('#' comments); "
                   "then /v1/ routes need 'Authorization: Bearer KEY' (/health and /metrics stay open)")
    p.add_argument("--max-concurrency", type=int, default=16, metavar="N",
                   help="sequences decoded together: KV-cache rows (default 16)")
    p.add_argument("--max-queue", type=int, default=64, metavar="M",
                   help="requests that may wait for a row; more get 429 (default 64)")
    p.add_argument("--queue-timeout", type=float, default=30.0, metavar="S",
                   help="seconds a request may wait for a row before it gets 429 (default 30)")
    p.add_argument("--kv-cache-mb", type=float, default=0.0, metavar="MB",
                   help="cap on the KV-cache memory, which may lower the rows; the pool holds one spare row "
                   "(default 0 = N full-context rows and the spare)")
    p.add_argument("--max-body-mb", type=float, default=1.0, metavar="MB",
                   help="largest request body accepted; larger gets 413 (default 1)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--compile", choices=("on", "off"), default="on",
                   help="torch.compile the decode step and the prefill: a one-off 10-60 s at start (up to ~90 s "
                   "the first time, with an empty compile cache) for decode steps "
                   "~2x faster on a CPU and inside the CUDA graphs on a GPU, prefills 1.5-1.9x faster on a CPU "
                   "(default on)")
    p.add_argument("--cuda-graphs", choices=("on", "off"), default="on",
                   help="on a GPU, capture the decode step as CUDA graphs for padded batch sizes 1, 2, 4, ... up to "
                   "--max-concurrency (a few seconds at start) and replay them: one launch per step instead of one "
                   "per kernel (default on; no effect on a CPU; with --compile on, the graphs replay the compiled step)")
    p.add_argument("--decode-steps", type=int, default=16, metavar="K",
                   help="greedy tokens decoded per scheduler step, each step's token fed to the next on the device: "
                   "one wait for the device and one burst of events per K tokens, while every running request is "
                   "greedy without penalties or logprobs; new requests and cancellations wait for the burst "
                   "(default 16; 1 = one token per step)")
    p.add_argument("--speculate", type=int, default=4, metavar="K",
                   help="prompt-lookup speculation: while every running request is greedy (without penalties or "
                   "logprobs), each step feeds a sequence K tokens guessed from its own prompt and output besides its "
                   "last one, and keeps those the model agrees with: the same text (up to rounding), up to K + 1 "
                   "tokens per step for far less than K + 1 steps cost on a small model (default 4; 0 = off)")
    p.add_argument("--speculate-max-batch", type=int, default=0, metavar="N",
                   help="speculate only while at most N sequences run: at larger batches the extra tokens per "
                   "step cost more than they save on a CPU; with compile, 1 row and more rows are one compile each "
                   "at start (default 0 = auto: 2 on a CPU, none on a GPU, where it is not measured yet)")
    p.add_argument("--engine-process", choices=("auto", "on", "off"), default="auto",
                   help="run the engine in a process of its own, apart from the HTTP server, so that their Python "
                   "does not take turns under one GIL (as vLLM's engine core); auto = on with a GPU, off on a CPU, "
                   "whose cores the two processes would share anyway (default auto)")
    p.add_argument("--model-name", metavar="NAME", help="the model name clients send (default: the run name)")
    p.add_argument("--guard", metavar="POLICY", help="guard rails on input and output: a policy YAML file, or "
                   "'builtin' for the shipped default (default: no guard)")


def read_api_keys(path: str) -> set[str]:
    """The keys in `path`, one per line; blank lines and '#' comments skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        raise UsageError(f"cannot read --api-key-file {path}: {reason}; give a UTF-8 text file with one key "
                         f"per line") from None
    keys = set()
    for number, line in enumerate(lines, 1):
        key = line.strip()
        if not key or key.startswith("#"):
            continue
        if not API_KEY.fullmatch(key):
            raise UsageError(f"line {number} of --api-key-file {path} is not a usable key; keys are printable "
                             f"ASCII without spaces")
        keys.add(key)
    if not keys:
        raise UsageError(f"--api-key-file {path} holds no key; put one key per line")
    return keys


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, handed to uvicorn: a busy port fails here, with a message, before loading."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise UsageError(f"cannot resolve --host {host}: {e.strerror}; give an IP address or a known name") \
            from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart despite TIME_WAIT
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror}; pick another --port (or stop what "
                         f"uses it)") from None
    return sock


def load_guard(policy: str) -> Guard:
    """The guard for --guard, its detectors loaded and run once (so the first request does not pay for it)."""
    with err.status(f"loading the guard policy {policy} ..."):
        guard = Guard.from_policy(policy)
        for direction in DIRECTIONS:
            guard.check("warm-up", direction)
    err.print(f"guard: {guard.policy.source} (detectors: {', '.join(guard.policy.detectors)})", markup=False)
    return guard


def check_args(args: argparse.Namespace) -> str:
    """Check the flags that the engine does not; return the device to run on."""
    for flag in ("queue_timeout", "kv_cache_mb", "max_body_mb"):
        if not math.isfinite(getattr(args, flag)):
            raise UsageError(f"--{flag.replace('_', '-')} must be a finite number, got {getattr(args, flag)}")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must lie in 0..65535, got {args.port}")
    if not args.max_body_mb > 0:
        raise UsageError(f"--max-body-mb must be > 0, got {args.max_body_mb}")
    if args.model_name is not None and not 1 <= len(args.model_name) <= 256:
        raise UsageError("--model-name must hold 1 to 256 characters")
    try:
        return str(resolve_device(args.device, "--device"))
    except RuntimeError:
        raise UsageError(f"--device {args.device!r} is not a device; use auto, cpu, cuda or cuda:N") from None


def stop_on_signals(engine: Engine | EngineProcess) -> dict:
    """Ctrl-C and SIGTERM (docker stop, systemd) end the engine's loop between steps, so nothing is cut half-way
    (a ledger write, a step); a second Ctrl-C interrupts at once. Returns the handlers to restore."""
    def stop(signum: int, frame) -> None:
        engine.request_stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)
    return {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}


def summarize(ledger: Ledger, run_id: int, engine: Engine | EngineProcess | None, wall_seconds: float) -> dict:
    """The serve run's totals, from its request rows in the ledger; cost and CO2 of the device time requests used."""
    rows = ledger.get_requests(run_id)
    s = {"requests": len(rows), "completed": sum(r["status"] == "completed" for r in rows),
         "blocked_input": sum(r["status"] == "blocked:input" for r in rows),
         "blocked_output": sum(r["status"] == "blocked:output" for r in rows),
         "guard_findings": len(ledger.get_guard_events(run_id)),
         "prompt_tokens": sum(r["prompt_tokens"] or 0 for r in rows),
         "completion_tokens": sum(r["completion_tokens"] or 0 for r in rows),
         "flops": sum(r["flops"] or 0.0 for r in rows),
         "device_seconds": sum(r["device_seconds"] or 0.0 for r in rows),
         "energy_j": sum(r["energy_j"] or 0.0 for r in rows), "wall_seconds": wall_seconds}
    s["tokens"] = s["prompt_tokens"] + s["completion_tokens"]
    if engine is not None:
        s |= {"energy_label": engine.energy_label, "energy_measured": engine.energy_measured,
              "price_per_hour": engine.price_per_hour, "carbon_g_per_kwh": default_carbon_g_per_kwh()}
        s |= footprint(s["energy_j"], s["device_seconds"], engine.price_per_hour, default_carbon_g_per_kwh())
    return s


def run(args: argparse.Namespace) -> int:
    device = check_args(args)
    compile_on = args.compile == "on"
    config = EngineConfig(max_concurrency=args.max_concurrency, max_queue=args.max_queue,
                          queue_timeout=args.queue_timeout, kv_cache_mb=args.kv_cache_mb, device=device,
                          compile=compile_on, cuda_graphs=args.cuda_graphs == "on",
                          decode_steps=args.decode_steps, speculate=args.speculate,
                          speculate_max_batch=args.speculate_max_batch)
    config.validate()
    api_keys = read_api_keys(args.api_key_file) if args.api_key_file is not None else None
    guard = load_guard(args.guard) if args.guard is not None else None
    own_process = args.engine_process == "on" or (args.engine_process == "auto" and device.startswith("cuda"))
    workspace = workspace_of(args)
    path = resolve_checkpoint(args.ckpt, workspace.runs_dir)
    model = args.model_name or read_config(path).name or path.parent.parent.name  # the run name
    sock = bind(args.host, args.port)
    port = sock.getsockname()[1]
    ledger = Ledger(workspace.ledger_path)
    run_config = {"ckpt": args.ckpt, "model_name": model, "host": args.host, "port": port,
                  "api_key_file": args.api_key_file, "max_concurrency": args.max_concurrency,
                  "max_queue": args.max_queue, "queue_timeout": args.queue_timeout, "kv_cache_mb": args.kv_cache_mb,
                  "max_body_mb": args.max_body_mb, "device": args.device, "compile": compile_on,
                  "cuda_graphs": args.cuda_graphs == "on", "decode_steps": config.decode_steps,
                  "speculate": config.speculate, "speculate_max_batch": config.speculate_max_batch,
                  "guard": None if guard is None else guard.policy.source, "engine_process": own_process}
    run_id = ledger.start_run(f"serve-{model}-{time.strftime('%Y%m%d-%H%M%S')}", "serve", run_config,
                              {**describe_machine(), "device": device}, str(path))
    engine: Engine | EngineProcess | None = None
    status, error, started = "completed", None, time.monotonic()
    host = f"[{args.host}]" if ":" in args.host else args.host
    try:
        if own_process:
            engine = EngineProcess(path, config, model_id=model, ledger_path=workspace.ledger_path, run_id=run_id,
                                   guard=guard,
                                   on_start=lambda doing: err.print(f"{doing} ...", end=" "))
            if start_work(config) is not None:
                info = engine.info
                err.print(start_summary(info["graphs"], info["graph_seconds"], info["compile_seconds"],
                                        compile_on and not info["prefill_compiled"]))
        else:
            if (doing := start_work(config)) is not None:
                err.print(f"{doing} ...", end=" ")
            engine = Engine.from_checkpoint(path, config, model_id=model, ledger=ledger, run_id=run_id, guard=guard)
            compile_seconds = engine.warm_up()
            if doing is not None:
                graphs = engine.decode_graphs
                err.print(start_summary(0 if graphs is None else len(graphs.graphs), engine.graph_seconds,
                                        compile_seconds, compile_on and not engine.prefill_compiled))
        app = create_app(engine, api_keys=api_keys, max_body_bytes=int(args.max_body_mb * 2**20))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning",
                                               timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S))
        # HTTP in a side thread; this main thread runs the engine (where torch's CPU kernels run fastest) or, with
        # the engine in its own process, watches it
        http = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="lmforge-http", daemon=True)
        http.start()
        while not server.started and http.is_alive():
            time.sleep(0.01)
        if not http.is_alive():
            raise LmforgeError(f"the HTTP server did not start on {args.host}:{port}")
        where = f", engine in process {engine.pid}" if own_process else ""
        if engine.speculates_up_to:
            where = f", speculating at up to {engine.speculates_up_to} sequences{where}"
        err.print(f"serving {model} (context {engine.context_len}, {engine.slots} slots{where}) at "
                  f"http://{host}:{port}/v1 | energy: {engine.energy_label}", soft_wrap=True, markup=False)
        previous = stop_on_signals(engine)
        try:
            engine.run()  # until Ctrl-C or SIGTERM
        except KeyboardInterrupt:  # a second Ctrl-C
            pass
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            server.should_exit = True  # open streams get GRACEFUL_SHUTDOWN_S to finish
            http.join(GRACEFUL_SHUTDOWN_S + 2)
    except BaseException as e:  # Ctrl-C while loading, or a failure
        status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        error = f"{type(e).__name__}: {e}"
        raise
    finally:
        sock.close()
        if engine is not None:
            engine.stop()
        summary = summarize(ledger, run_id, engine, time.monotonic() - started)
        ledger.finish_run(run_id, status, summary=summary, error=error)
    err.print(f"served {summary['requests']} requests: {summary['prompt_tokens']:,} prompt + "
              f"{summary['completion_tokens']:,} completion tokens, {human(summary['flops'], 'FLOP')}, "
              f"{summary['device_seconds']:.1f} device-s, {summary['energy_j']:.1f} J", soft_wrap=True, markup=False)
    if guard is not None:
        err.print(f"guard: {summary['blocked_input']} prompts refused, {summary['blocked_output']} outputs cut off, "
                  f"{summary['guard_findings']} findings audited", markup=False)
    return 0
