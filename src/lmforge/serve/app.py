"""The OpenAI-compatible HTTP server: FastAPI routes that translate HTTP to engine calls and events back to HTTP.

    GET  /health               {"status": "ok", running, waiting, slots}; 503 when the engine is not running
    GET  /v1/models            the one model served
    POST /v1/completions       OpenAI completions (legacy logprobs, echo: what lm-evaluation-harness uses)
    POST /v1/chat/completions  OpenAI chat completions, through the checkpoint's chat template
    GET  /metrics              Prometheus text format

No tensor is touched here: request parsing and limits live in protocol.py, generation in engine.py. One pure ASGI
layer (`Gate`) sits outside the routes: it counts every response in `lmforge_requests_total{route,status}`,
checks the API key (routes under /v1/ only: /health and /metrics stay open for probes and scrapers), refuses bodies
over the size limit (by Content-Length, and by counting bytes as they arrive, so a huge chunked body is cut off
without being buffered), and turns any exception that escapes a route, which is a bug, into a logged 500.

Every error is an OpenAI error object {"error": {"message", "type", "param", "code"}}: 400 bad input, 401 bad key,
404/405 unknown route or method, 413 body too large, 429 overloaded (with Retry-After), 503 engine not running.

A streamed response starts only once the engine has admitted and prefilled the request, so a request that times
out in the queue still gets a proper 429. A client that goes away is noticed (disconnect polled while waiting,
or the stream task cancelled) and its request cancelled, which frees its KV-cache rows at the next engine step;
such responses are counted with status 499 ("client closed request"). There is no /docs page: the API is OpenAI's.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmforge.errors import LmforgeError
from lmforge.guard.guard import Verdict
from lmforge.serve.engine import (
    Delta,
    Engine,
    Event,
    Failed,
    Finished,
    InvalidRequest,
    Overloaded,
    Prefilled,
    Prompt,
    RequestHandle,
    SamplingParams,
    TokenLogprob,
)
from lmforge.serve.protocol import (
    IGNORED_PARAMS_HEADER,
    ChatRequest,
    CompletionRequest,
    RequestError,
    chat_body,
    chat_logprobs,
    completion_body,
    completion_logprobs,
    error_body,
    guard_body,
    ignored_params_header,
    models_body,
    parse_request,
)

log = logging.getLogger("lmforge.serve")

ROUTES = ("/health", "/v1/models", "/v1/completions", "/v1/chat/completions", "/metrics")  # metric labels
DISCONNECT_POLL_S = 0.2  # how often a request waiting on the engine checks that its client is still there
CLIENT_GONE = 499  # nginx's status for "client closed request"; only ever seen in the metrics
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
               500: "internal_server_error", 503: "service_unavailable"}


class APIError(Exception):
    """An error response: status, one-line message, the offending field, headers (e.g. Retry-After)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, ERROR_TYPES.get(self.status, "invalid_request_error"),
                                       self.param, self.code), status_code=self.status, headers=self.headers)


class BodyTooLarge(Exception):
    """Raised from `receive` once a request body has passed the size limit."""


class Gate:
    """The outermost ASGI layer: counts responses, checks keys and body size, turns escaped bugs into 500s."""

    def __init__(self, app: ASGIApp, engine: Engine, api_keys: set[str] | None, max_body_bytes: int):
        self.app, self.metrics, self.max_body_bytes = app, engine.metrics, max_body_bytes
        self.api_keys = [key.encode() for key in api_keys or ()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in ROUTES else "other"
        status: int | None = None

        async def counted_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge
            return message

        too_large = APIError(413, f"the request body is over this server's limit of {self.max_body_bytes:,} bytes; "
                                  f"send less (or start the server with a larger --max-body-mb)",
                             code="request_too_large")
        try:
            headers = dict(scope["headers"])
            if self.api_keys and scope["path"].startswith("/v1/") and not self._authorized(headers):
                await APIError(401, "missing or wrong API key; send the header 'Authorization: Bearer KEY'",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
                               ).response()(scope, receive, counted_send)
                return
            length = headers.get(b"content-length", b"0")
            if length.isdigit() and int(length) > self.max_body_bytes:
                await too_large.response()(scope, receive, counted_send)
                return
            await self.app(scope, limited_receive, counted_send)
        except BodyTooLarge:
            if status is None:
                await too_large.response()(scope, receive, counted_send)
        except Exception:
            log.exception("bug while answering %s %s", scope["method"], scope["path"])
            if status is None:
                await APIError(500, "internal server error (a bug; the server log has the traceback)"
                               ).response()(scope, receive, counted_send)
        finally:
            if status is not None:
                self.metrics.requests.labels(route, str(status)).inc()

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, key = headers.get(b"authorization", b"").partition(b" ")
        # compare with every key, in constant time: neither which key nor how much of it matched leaks
        # a list, not a generator: every key is compared, so the time taken says nothing about which one matched
        return scheme.lower() == b"bearer" and any([hmac.compare_digest(key.strip(), k) for k in self.api_keys])


def create_app(engine: Engine, *, api_keys: set[str] | None = None, max_body_bytes: int = 1_048_576) -> FastAPI:
    """The HTTP server for a started engine; `api_keys` (if any) guard the /v1/ routes."""
    app = FastAPI(title="lmforge", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Gate, engine=engine, api_keys=api_keys, max_body_bytes=max_body_bytes)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no route {request.url.path}; the routes are {', '.join(ROUTES)}",
                   405: f"{request.url.path} does not take {request.method}"}.get(e.status_code, str(e.detail))
        return APIError(e.status_code, message, headers=dict(e.headers or {})).response()

    @app.get("/health")
    async def health() -> JSONResponse:
        if not engine.alive:
            return JSONResponse({"status": "error", "message": f"the engine is not running: {engine.error}"}, 503)
        return JSONResponse({"status": "ok", **engine.stats()})

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse(models_body(engine.model_id, engine.created))

    @app.get("/metrics")
    async def metrics() -> Response:
        # off the event loop: with the engine in its own process, rendering asks it for its share
        body = await run_in_threadpool(engine.metrics.render)
        return Response(body, headers={"Content-Type": engine.metrics.content_type})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await serve(engine, request, await read_request(request, CompletionRequest))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await serve(engine, request, await read_request(request, ChatRequest))

    return app


async def read_request(request: Request,
                       model: type[CompletionRequest | ChatRequest]) -> CompletionRequest | ChatRequest:
    try:
        return parse_request(await request.body(), model)
    except RequestError as e:
        raise APIError(400, str(e), e.param) from None


async def prepare(engine: Engine, body: CompletionRequest | ChatRequest) -> Prompt:
    """The request's prompt as token ids, through the input rail if the engine has a guard."""
    if body.model != engine.model_id:  # the name is only ever compared, never used as a path
        raise APIError(400, f"model {body.model!r} is not served here; this server serves {engine.model_id!r} "
                            f"(GET /v1/models)", "model", "model_not_found")
    chat = isinstance(body, ChatRequest)
    kwargs = {"messages": [m.as_dict() for m in body.messages]} if chat else {"prompt": body.prompt}
    try:
        if engine.guard is None:
            return engine.prepare(**kwargs)
        return await run_in_threadpool(engine.prepare, **kwargs)  # the guard takes milliseconds: off the loop
    except InvalidRequest as e:
        raise APIError(400, str(e), "messages" if chat else "prompt") from None


def submit(engine: Engine, body: CompletionRequest | ChatRequest,
           prompt: Prompt) -> tuple[RequestHandle, SamplingParams]:
    """Queue the request in the engine; APIError if it cannot be."""
    if isinstance(body, ChatRequest):
        params = body.sampling_params(engine.chat_stop_token_ids)
    else:
        params = body.sampling_params()
    try:
        return engine.submit(prompt, params), params
    except InvalidRequest as e:
        raise APIError(400, str(e)) from None
    except Overloaded as e:
        raise APIError(429, str(e), code="overloaded", headers={"Retry-After": str(e.retry_after)}) from None
    except LmforgeError as e:  # the engine failed earlier (a bug or a device fault), and says so
        raise APIError(503, str(e)) from None


async def serve(engine: Engine, request: Request, body: CompletionRequest | ChatRequest) -> Response:
    """Submit to the engine and answer: one JSON body, or server-sent events when body.stream."""
    headers = {IGNORED_PARAMS_HEADER: ignored_params_header(body.ignored_params)} if body.ignored_params else {}
    try:
        handle, params = submit(engine, body, await prepare(engine, body))
    except APIError as e:
        e.headers.update(headers)
        raise
    chat = isinstance(body, ChatRequest)
    events, streaming = Listener(handle, request), False
    try:
        prefilled = await events.next()  # waits for admission: a queue timeout is still a 429
        if prefilled is None:
            return Response(status_code=CLIENT_GONE)
        if isinstance(prefilled, Failed):
            raise failed_error(prefilled, headers)
        formatter = Formatter(engine.model_id, handle.id, params, chat, body.include_usage, prefilled)
        if body.stream:
            streaming = True
            return StreamingResponse(stream(events, prefilled, formatter), media_type="text/event-stream",
                                     headers={**headers, "Cache-Control": "no-cache"})
        collected = Collected(params.n)
        while True:
            event = await events.next()
            if event is None:
                return Response(status_code=CLIENT_GONE)
            if isinstance(event, Failed):
                raise failed_error(event, headers)
            if isinstance(event, Delta):
                collected.add(event)
            elif isinstance(event, Finished):
                return JSONResponse(formatter.response(prefilled, collected, event), headers=headers)
    finally:
        if not streaming:  # a stream cancels in its own finally, when it ends
            handle.cancel()


def failed_error(event: Failed, headers: dict[str, str]) -> APIError:
    retry = {"Retry-After": "1"} if event.status == 429 else {}
    return APIError(event.status, event.message, code=event.code, headers={**headers, **retry})


class Listener:
    """One request's engine events, while its client is there: `next()` returns None once the client has gone.

    The disconnect check runs every DISCONNECT_POLL_S whether or not events arrive (tokens may come faster)."""

    def __init__(self, handle: RequestHandle, request: Request):
        self.handle, self.request = handle, request
        self.checked = time.monotonic()

    async def next(self) -> Event | None:
        if time.monotonic() - self.checked < DISCONNECT_POLL_S and (event := self.handle.poll()) is not None:
            return event  # the common case under load: no future, no wait
        getter = asyncio.ensure_future(anext(self.handle))
        try:
            while True:
                wait = self.checked + DISCONNECT_POLL_S - time.monotonic()
                if wait > 0:
                    done, _ = await asyncio.wait((getter,), timeout=wait)
                    if done:
                        return getter.result()
                self.checked = time.monotonic()
                if await self.request.is_disconnected():
                    return None
        finally:
            getter.cancel()  # no-op once done


async def stream(events: Listener, prefilled: Prefilled, formatter: Formatter) -> AsyncIterator[str]:
    """Server-sent events: opening chunks, one chunk per delta, the usage chunk if asked for, [DONE]."""
    try:
        for chunk in formatter.opening_chunks(prefilled):
            yield sse(chunk)
        pending: Event | None = None
        while True:
            event, pending = pending or await events.next(), None
            if event is None:
                return
            if isinstance(event, Delta):
                # deltas that piled up while the client or this loop was slower than the engine go out as one
                # chunk per choice: fewer, larger writes exactly when the server is busiest
                deltas = [event]
                while isinstance(more := events.handle.poll(), Delta):
                    deltas.append(more)
                pending = more
                text = "".join(sse(chunk) for d in merge_deltas(deltas)
                               if (chunk := formatter.delta_chunk(d)) is not None)
                if text:
                    yield text
            elif isinstance(event, Finished):
                if formatter.include_usage:
                    yield sse(formatter.usage_chunk(event))
                break
            elif isinstance(event, Failed):  # too late for a status code: an error event ends the stream
                yield sse(error_body(event.message, ERROR_TYPES.get(event.status, "internal_server_error"),
                                     code=event.code))
                break
        yield "data: [DONE]\n\n"
    finally:
        events.handle.cancel()


def merge_deltas(deltas: list[Delta]) -> list[Delta]:
    """Consecutive deltas of each choice joined into one, choices in order of appearance."""
    merged: dict[int, Delta] = {}
    for d in deltas:
        m = merged.get(d.index)
        if m is None:
            merged[d.index] = Delta(d.index, d.text, list(d.token_ids), None if d.logprobs is None else
                                    list(d.logprobs), d.finish_reason, d.guard)
        else:
            m.text += d.text
            m.token_ids += d.token_ids
            if d.logprobs is not None:
                m.logprobs = (m.logprobs or []) + d.logprobs
            m.finish_reason, m.guard = d.finish_reason, d.guard
    return list(merged.values())


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(',', ':'))}\n\n"


class Collected:
    """A non-streamed request's deltas, gathered per choice."""

    def __init__(self, n: int):
        self.texts = [""] * n
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
        self.finish_reasons: list[str | None] = [None] * n
        self.verdicts: list[Verdict | None] = [None] * n  # the output rail's, per choice

    def add(self, delta: Delta) -> None:
        self.texts[delta.index] += delta.text
        self.logprobs[delta.index] += delta.logprobs or []
        self.finish_reasons[delta.index] = delta.finish_reason
        self.verdicts[delta.index] = delta.guard


class Formatter:
    """One request's engine events as OpenAI bodies: completions (legacy logprobs, echo) or chat."""

    def __init__(self, model: str, request_id: str, params: SamplingParams, chat: bool, include_usage: bool,
                 prefilled: Prefilled):
        self.model, self.params, self.chat, self.include_usage = model, params, chat, include_usage
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_id  # the engine's id: the ledger's rows use it
        self.input_verdict = prefilled.guard  # None without a guard
        self.created = int(time.time())
        self.offsets = [0] * params.n  # completions: characters streamed so far per choice (text_offset)

    def _body(self, choices: list[dict[str, Any]], usage=None, chunk: bool = False,
              verdicts: list[tuple[int, Verdict | None]] | None = None) -> dict[str, Any]:
        make = chat_body if self.chat else completion_body
        body = make(self.id, self.created, self.model, choices, usage, chunk)
        if verdicts is not None and self.input_verdict is not None:
            body["lmforge"] = guard_body(self.input_verdict, verdicts)
        return body

    def _prompt_logprobs(self, prefilled: Prefilled) -> list[TokenLogprob]:
        return (prefilled.prompt_logprobs or []) if self.params.echo else []

    def response(self, prefilled: Prefilled, c: Collected, finished: Finished) -> dict[str, Any]:
        choices = []
        for i in range(self.params.n):
            if self.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": c.texts[i]},
                                "logprobs": None if self.params.logprobs is None else chat_logprobs(c.logprobs[i]),
                                "finish_reason": c.finish_reasons[i]})
                continue
            logprobs = None
            if self.params.logprobs is not None:
                logprobs = completion_logprobs(self._prompt_logprobs(prefilled) + c.logprobs[i], 0)
            text = prefilled.prompt_text + c.texts[i] if self.params.echo else c.texts[i]
            choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reasons[i]})
        return self._body(choices, finished.usage, verdicts=list(enumerate(c.verdicts)))

    def opening_chunks(self, prefilled: Prefilled) -> list[dict[str, Any]]:
        """Chat: the assistant role for each choice. Completions with echo: the prompt (and its logprobs)."""
        if self.chat:
            return [self._body([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None}], chunk=True) for i in range(self.params.n)]
        if not self.params.echo:
            return []
        prompt_logprobs = self._prompt_logprobs(prefilled)
        logprobs = None if self.params.logprobs is None else completion_logprobs(prompt_logprobs, 0)
        self.offsets[0] = sum(len(lp.token) for lp in prompt_logprobs)
        return [self._body([{"index": 0, "text": prefilled.prompt_text, "logprobs": logprobs,
                             "finish_reason": None}], chunk=True)]

    def delta_chunk(self, d: Delta) -> dict[str, Any] | None:
        if not d.text and d.finish_reason is None and d.logprobs is None:  # e.g. half a UTF-8 character
            return None
        if self.chat:
            return self._body([{"index": d.index, "delta": {"content": d.text} if d.text else {},
                                "logprobs": None if d.logprobs is None else chat_logprobs(d.logprobs),
                                "finish_reason": d.finish_reason}], chunk=True, verdicts=self._ending(d))
        logprobs = None
        if d.logprobs is not None:
            logprobs = completion_logprobs(d.logprobs, self.offsets[d.index])
            self.offsets[d.index] += sum(len(lp.token) for lp in d.logprobs)
        return self._body([{"index": d.index, "text": d.text, "logprobs": logprobs,
                            "finish_reason": d.finish_reason}], chunk=True, verdicts=self._ending(d))

    @staticmethod
    def _ending(d: Delta) -> list[tuple[int, Verdict | None]] | None:
        """The output verdict to show on a chunk: only on the one that ends its choice."""
        return None if d.finish_reason is None else [(d.index, d.guard)]

    def usage_chunk(self, finished: Finished) -> dict[str, Any]:
        return self._body([], finished.usage, chunk=True)
