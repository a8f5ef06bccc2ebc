"""The engine in a process of its own, behind the interface the HTTP layer calls (vLLM V1's engine core).

Why: on a GPU at hundreds of requests a second, the HTTP layer's Python (routing, JSON, server-sent events) and the
engine loop's Python (scheduling, detokenising, events) are each about a millisecond per request, and in one
process they take turns under one GIL. Here the engine runs in a child process's main thread, and the HTTP process
keeps only the request side (`RequestChecker`: tokenising, the input rail, the checks that answer 400 and 429 at
once) and a table of open requests. (On an H100 this measured 3% faster at 32 concurrent: bench/RESULTS.md.)

    HTTP process                                     engine process (spawned; its loop reads between steps)
    EngineProcess.submit  --("submit", id, Prompt, SamplingParams)-->  Engine.submit
    RemoteHandle.cancel   --("cancel", id)------------------------->  RequestHandle.cancel
    reader thread         <--("events", [(id, event), ...], stats)-  Engine._deliver, once per step
    /metrics              --("call", n, "metrics") <--("reply", n, families)--  the engine's ServeMetrics

Nothing in the HTTP process waits on the pipe: the event loop sends what the pipe takes at once, a writer thread
the rest (PipeWriter), and a reader thread receives. The engine process has one thread: between two steps its
loop takes in what the pipe holds (Engine.receive), so no thread takes the GIL from it mid-step.

Both processes keep a ServeMetrics: the HTTP side counts requests by status and the input rail, the engine the
rest, and /metrics renders their sum. The engine process writes its requests and guard findings to the ledger
itself (SQLite in WAL mode takes writers from several processes). It ignores SIGINT and SIGTERM, which may be sent
to the whole process group: the HTTP process says when to stop (and kills it if it does not), and a HTTP process
that dies closes the pipe, which stops the engine too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import multiprocessing
import os
import queue
import signal
import socket
import struct
import threading
import time
import weakref
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

from lmforge.checkpoint import load_tokenizer
from lmforge.errors import LmforgeError
from lmforge.guard.guard import Guard
from lmforge.meter.ledger import Ledger
from lmforge.serve.engine import (
    Engine,
    EngineConfig,
    Event,
    Failed,
    Finished,
    InvalidRequest,
    Overloaded,
    Prompt,
    Request,
    RequestChecker,
    RequestHandle,
    Result,
    SamplingParams,
    _put_all,
    new_request_id,
    start_work,
)
from lmforge.serve.metrics import ServeMetrics

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = 10.0  # /metrics asks the engine process for its share: it answers between two steps


class RemoteHandle(RequestHandle):
    """A request's handle in the HTTP process: events arrive from the engine process; cancel tells it."""

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop | None, engine: EngineProcess):
        super().__init__(request, loop)
        self._engine = engine

    def cancel(self) -> None:
        if self._request.cancelled or self.done or self.id not in self._engine._handles:  # over already
            return
        self._request.cancelled = True
        self._engine._send(("cancel", self.id))


class EngineProcess(RequestChecker):
    """An Engine for the checkpoint at `path`, run in a spawned process; the same calls as Engine's for the HTTP
    layer (prepare, submit, stats, alive, error, metrics, model_id, ...). Starting it loads the model, captures
    CUDA graphs or compiles there, and returns once the engine is ready; `stop()` ends it (and so does the
    interpreter's exit)."""

    def __init__(self, path: Path, config: EngineConfig, *, model_id: str, ledger_path: Path | None = None,
                 run_id: int | None = None, guard: Guard | None = None,
                 on_start: Callable[[str], None] | None = None):
        config.validate()
        tokenizer, template = load_tokenizer(path)
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no copy of this one's threads
        self._conn, child_conn = context.Pipe()
        # the queue is bounded here, in the HTTP process (submit); the engine's own bound, counted before the
        # requests it has not admitted yet get their rows, must not refuse what this side let through
        child_config = dataclasses.replace(config, max_queue=config.max_queue + config.max_concurrency)
        spec = dict(path=str(path), config=child_config, model_id=model_id, run_id=run_id,
                    policy=None if guard is None else guard.policy,  # the engine process builds its own guard
                    ledger_path=None if ledger_path is None else str(ledger_path))
        # not a daemon: torch.compile may start processes of its own there
        self._process = context.Process(target=engine_main, args=(child_conn, spec), name="lmforge-engine")
        self._process.start()
        child_conn.close()
        self.error: str | None = None
        try:
            self.info = self._wait_ready(on_start)
        except BaseException:  # a failure or Ctrl-C while it loads: leave no engine behind
            self._process.kill()  # it ignores SIGTERM
            self._process.join(5)
            self._conn.close()
            raise
        super().__init__(tokenizer, template, guard, ServeMetrics(), self.info["context_len"], self.info["slots"])
        self.model_id, self.created = model_id, self.info["created"]
        self.energy_label, self.energy_measured = self.info["energy_label"], self.info["energy_measured"]
        self.price_per_hour = self.info["price_per_hour"]
        self.speculates_up_to = self.info["speculates_up_to"]
        self.max_queue = config.max_queue
        self.metrics.remote = lambda: self._call("metrics")
        self._stats = {"running": 0, "waiting": 0, "slots": self.slots}  # as the engine sent them last
        self._stop_requested = False
        self._handles: dict[str, RemoteHandle] = {}  # open requests in arrival order; the reader drops ended ones
        self._closed = False  # the pipe has closed: open requests have been failed, and new ones are refused
        self._lock = threading.Lock()  # over _handles, _closed and the calls waiting for a reply
        self._ids = itertools.count()
        self._calls = itertools.count()
        self._replies: dict[int, list] = {}  # call number -> [threading.Event, value]
        self._writer = PipeWriter(self._conn)
        self._reader = threading.Thread(target=self._read, name="lmforge-engine-reader", daemon=True)
        self._reader.start()
        # multiprocessing waits at exit for the engine process, which waits for the pipe to close: stop it first
        self._finalizer = weakref.finalize(self, shut_down, self._process, self._writer)

    def _wait_ready(self, on_start: Callable[[str], None] | None) -> dict[str, Any]:
        """The engine's first messages: what it is doing ("starting"), then "ready" with its facts."""
        while True:
            if not self._conn.poll(0.2):
                if not self._process.is_alive():
                    raise LmforgeError(f"the engine process exited (code {self._process.exitcode}) while starting")
                continue
            try:
                kind, value = self._conn.recv()
            except EOFError:  # it died without a word (killed, out of memory)
                self._process.join(10)
                raise LmforgeError(f"the engine process exited (code {self._process.exitcode}) while starting") \
                    from None
            if kind == "ready":
                return value
            if kind == "failed":
                self._process.join(10)
                raise LmforgeError(value)
            if on_start is not None:
                on_start(value)

    # ---- the HTTP side's calls ---------------------------------------------------------------------------

    def submit(self, prompt: str | list[int] | Prompt, params: SamplingParams) -> RequestHandle:
        """As Engine.submit: validate here, bound the queue as the engine would, and send the request."""
        if not isinstance(prompt, Prompt):
            prompt = self.prepare(prompt)
        self.check(prompt.ids, params)
        if not self.alive:
            raise LmforgeError(f"the engine process is not running ({self.error or 'stopped'})")
        request = Request(new_request_id(self._ids), prompt.ids, params, time.monotonic(), prompt.verdict)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        handle = request.handle = RemoteHandle(request, loop, self)
        with self._lock:
            if self._closed:
                raise LmforgeError(f"the engine process is not running ({self.error or 'stopped'})")
            waiting = self._waiting_requests()
            if waiting >= self.max_queue and not (prompt.verdict is not None and prompt.verdict.blocked):
                self.metrics.rejected.labels("queue_full").inc()
                raise Overloaded(f"the server is at capacity ({self.slots} running, {waiting} waiting); retry "
                                 f"shortly", retry_after=1)
            self._handles[request.id] = handle
        self._send(("submit", request.id, prompt, params, request.arrived))
        return handle

    def _waiting_requests(self) -> int:
        """Open requests that wait for rows: the engine admits them in arrival order while their n fit, and none
        overtakes another. Called with the lock held."""
        free, waiting = self.slots, 0
        for handle in self._handles.values():
            n = handle._request.params.n
            if waiting or n > free:
                waiting += 1
            else:
                free -= n
        return waiting

    def generate(self, prompt: str | list[int] | Prompt, params: SamplingParams,
                 timeout: float | None = None) -> Result:
        """Submit and wait, as Engine.generate."""
        return self.submit(prompt, params).result(timeout)

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def alive(self) -> bool:
        return self._process.is_alive() and self._reader.is_alive()

    def stats(self) -> dict[str, int]:
        """Running and waiting requests and slots, as of the engine's last step (sent with its events)."""
        return dict(self._stats)

    def run(self) -> None:
        """Wait until `request_stop()` (safe from a signal handler), as Engine.run does; LmforgeError if the engine
        process ends by itself."""
        while not self._stop_requested:
            if not self.alive:
                raise LmforgeError(f"the engine process ended: {self.error or 'it exited'} (exit code "
                                   f"{self._process.exitcode})")
            time.sleep(0.1)

    def request_stop(self) -> None:
        self._stop_requested = True

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the engine after its current step; it writes its last ledger rows and exits (or, after `timeout`
        seconds, is killed)."""
        if self._finalizer.detach() is not None:  # not stopped yet
            shut_down(self._process, self._writer, timeout)

    # ---- the pipe ----------------------------------------------------------------------------------------

    def _send(self, message: tuple) -> None:
        self._writer.send(message)

    def _call(self, name: str) -> Any:
        number = next(self._calls)
        reply = [threading.Event(), None]
        with self._lock:  # the reader, as it ends, answers every call registered before it closed
            if self._closed:
                raise LmforgeError(f"the engine process is not running ({self.error or 'stopped'})")
            self._replies[number] = reply
        try:
            self._send(("call", number, name))
            if not reply[0].wait(CALL_TIMEOUT_S):
                raise LmforgeError(f"the engine process did not answer {name!r} within {CALL_TIMEOUT_S:g} s")
            if reply[1] is None:
                raise LmforgeError(f"the engine process could not answer {name!r} ({self.error or 'see its log'})")
            return reply[1]
        finally:
            self._replies.pop(number, None)

    def _read(self) -> None:
        """The reader thread: events to their handles (one wake-up per event loop per message), replies to calls."""
        try:
            while True:
                kind, *body = self._conn.recv()
                if kind == "events":
                    items, self._stats = body
                    self._dispatch(items)
                elif kind == "reply":
                    number, value = body
                    reply = self._replies.get(number)
                    if reply is not None:
                        reply[1] = value
                        reply[0].set()
                elif kind == "failed":
                    self.error = body[0]
        except (EOFError, OSError):
            pass
        finally:
            self.error = self.error or "the engine process stopped"
            with self._lock:
                self._closed = True
                open_ids = list(self._handles)
            self._dispatch([(rid, Failed(503, f"the engine stopped: {self.error}")) for rid in open_ids])
            for reply in list(self._replies.values()):
                reply[0].set()  # with no value: the call raises
            self._writer.close()
            self._conn.close()

    def _dispatch(self, items: list[tuple[str, Event]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestHandle, Event]]] = {}
        for rid, event in items:
            with self._lock:
                handle = self._handles.get(rid)
                if handle is not None and isinstance(event, (Finished, Failed)):
                    del self._handles[rid]
            if handle is None:
                continue
            if handle._loop is None:
                handle._put(event)
            else:
                by_loop.setdefault(handle._loop, []).append((handle, event))
        for loop, handle_events in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, handle_events)
            except RuntimeError:  # that loop is closed: nobody is listening any more
                for handle, _ in handle_events:
                    handle.cancel()


class PipeWriter:
    """Sends messages down a multiprocessing pipe without ever waiting on it. A message the pipe takes whole at
    once goes from the caller's thread, the event loop's: handing each request to a writer thread cost 1-3 ms
    under load, the time that thread waited for the GIL. Whatever the pipe cannot take at once (the engine
    process is slow to read, or stuck) waits in order for a thread of its own, so the event loop never blocks.
    The bytes are framed as Connection.send frames them (multiprocessing keeps that format for compatibility), so
    the other end reads them with Connection.recv."""

    def __init__(self, conn: Connection):
        self._socket = socket.socket(fileno=os.dup(conn.fileno()))  # the same pipe: one end of a socket pair
        # blocking, whatever socket.setdefaulttimeout says: a timeout would make the pipe non-blocking for the
        # Connection too, which shares it (its recv would then fail as if the engine had died)
        self._socket.settimeout(None)
        self._lock = threading.Lock()  # over _queued and _closed, and the order of what goes out
        self._backlog: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._queued = 0  # messages in the backlog or being sent from it: later ones must queue behind them
        self._closed = False
        threading.Thread(target=self._drain, name="lmforge-engine-writer", daemon=True).start()

    def send(self, message: tuple) -> None:
        payload = ForkingPickler.dumps(message)
        header = struct.pack("!i", len(payload)) if len(payload) <= 0x7FFFFFFF else \
            struct.pack("!i", -1) + struct.pack("!Q", len(payload))
        data = header + payload
        with self._lock:
            if self._closed:
                return
            if not self._queued:
                try:
                    sent = self._socket.send(data, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    sent = 0
                except OSError:  # the engine process is gone: the reader fails what is open
                    return
                if sent == len(data):
                    return
                data = data[sent:]
            self._queued += 1
            self._backlog.put(data)

    def _drain(self) -> None:
        while (data := self._backlog.get()) is not None:
            try:
                self._socket.sendall(data)
            except OSError:  # the engine process is gone: nothing more goes out (the reader fails what is open)
                with self._lock:
                    self._closed = True
                break
            with self._lock:
                self._queued -= 1
        self._socket.close()

    def close(self) -> None:
        """Send nothing more (what is queued still goes out first)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._backlog.put(None)


def shut_down(process: multiprocessing.Process, writer: PipeWriter, timeout: float = 30.0) -> None:
    """Ask the engine process to stop after its current step (it writes its last ledger rows) and wait; kill it
    if it has not stopped within `timeout` (it ignores SIGTERM). Its pipe then closes, which ends the reader."""
    if process.is_alive():
        writer.send(("stop",))
        process.join(timeout)
        if process.is_alive():
            log.warning("the engine process did not stop in %.0f s; killing it", timeout)
            process.kill()
            process.join(5)


def engine_main(conn, spec: dict[str, Any]) -> None:
    """The engine process: build the Engine and run it in the main thread, which also reads the pipe between steps
    (Engine.receive). One thread, so no lock, and no thread that takes the GIL from the engine mid-step."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # they may reach the whole process group: the HTTP side decides
        signal.signal(sig, signal.SIG_IGN)
    try:
        config: EngineConfig = spec["config"]
        guard = None
        if spec["policy"] is not None:  # the output rail runs here (the input rail in the HTTP process)
            guard = Guard.from_policy(spec["policy"])
            guard.check("warm-up", "output")
        ledger = None if spec["ledger_path"] is None else Ledger(Path(spec["ledger_path"]))
        if (doing := start_work(config)) is not None:
            conn.send(("starting", doing))
        engine = Engine.from_checkpoint(Path(spec["path"]), config, model_id=spec["model_id"], ledger=ledger,
                                        run_id=spec["run_id"], guard=guard)
        compile_seconds = engine.warm_up()
    except Exception as e:  # LmforgeError says what to do; anything else is reported as it is
        conn.send(("failed", str(e) if isinstance(e, LmforgeError) else f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", dict(context_len=engine.context_len, slots=engine.slots, created=engine.created,
                             energy_label=engine.energy_label, energy_measured=engine.energy_measured,
                             price_per_hour=engine.price_per_hour, compile_seconds=compile_seconds,
                             graph_seconds=engine.graph_seconds, prefill_compiled=engine.prefill_compiled,
                             speculates_up_to=engine.speculates_up_to,
                             graphs=0 if engine.decode_graphs is None else len(engine.decode_graphs.graphs))))

    handles: dict[str, RequestHandle] = {}  # open requests, for cancel
    last_stats: dict[str, int] | None = None

    def forward(items: list[tuple[str, Event]]) -> None:
        """Events of one step (and the engine's counts, when they changed) in one message."""
        nonlocal last_stats
        for rid, event in items:
            if isinstance(event, (Finished, Failed)):
                handles.pop(rid, None)
        stats = engine.stats()
        if items or stats != last_stats:
            last_stats = stats
            try:
                conn.send(("events", items, stats))
            except OSError:  # the HTTP process is gone
                engine.request_stop()

    def submit(rid: str, prompt: Prompt, params: SamplingParams, arrived: float) -> None:
        try:
            handle = engine.submit(prompt, params, request_id=rid, arrived=arrived)
        except (InvalidRequest, Overloaded, LmforgeError) as e:  # checked by the HTTP side already: rare
            status = 400 if isinstance(e, InvalidRequest) else 429 if isinstance(e, Overloaded) else 503
            forward([(rid, Failed(status, str(e), "overloaded" if status == 429 else None))])
            return
        refused = []  # a request the input rail blocked is answered at once, on its handle
        while (event := handle.poll()) is not None:
            refused.append((rid, event))
        if refused:
            forward(refused)
        else:
            handles[rid] = handle

    def receive(timeout: float) -> None:
        """What the pipe holds, waiting up to `timeout` seconds for the first message."""
        try:
            while conn.poll(timeout):
                timeout = 0.0
                try:
                    kind, *body = conn.recv()
                except (EOFError, OSError):
                    raise
                except Exception:  # a bug: the pipe can no longer be trusted, so stop as if it had closed
                    log.exception("the engine process could not read a message")
                    engine.request_stop()
                    return
                if kind == "stop":
                    engine.request_stop()
                    return
                try:
                    if kind == "submit":
                        submit(*body)
                    elif kind == "cancel":
                        if (handle := handles.get(body[0])) is not None:
                            handle.cancel()
                    elif kind == "call":  # "metrics"
                        conn.send(("reply", body[0], list(engine.metrics.registry.collect())))
                except Exception as e:  # a bug: fail what the message was about, keep reading
                    log.exception("the engine process could not handle %r", kind)
                    if kind == "submit":
                        forward([(body[0], Failed(500, f"internal error: {type(e).__name__}: {e}"))])
                    elif kind == "call":
                        conn.send(("reply", body[0], None))
        except (EOFError, OSError):  # the HTTP process is gone
            engine.request_stop()

    engine.forward_events = forward
    engine.receive = receive
    try:
        engine.run()
    except Exception as e:
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        raise
