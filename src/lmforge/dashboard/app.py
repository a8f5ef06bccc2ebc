"""The dashboard's web server: one page, its static files, JSON endpoints on the ledger, and a chat proxy.

    GET  /                          the page (static/index.html; its script polls the endpoints below)
    GET  /static/...                dashboard.js, dashboard.css and the vendored uPlot chart library (MIT)
    GET  /api/runs?limit=N          the newest N runs as table rows (name, kind, status, steps, val bpb, energy, cost)
    GET  /api/runs/{run}            one run by name or id, in full: config, hardware, summary, metric names
    GET  /api/runs/{run}/metrics?since=STEP&names=loss,val_bpb
                                    the steps after STEP, columnar (see LedgerView.metrics); polled every ~2 s
    GET  /api/serve                 the model that `lmforge serve` at --serve-url offers, or why it cannot be reached
    POST /api/chat                  {messages, temperature, top_p, max_tokens}: streamed from the serve URL's
                                    /chat/completions as its server-sent events, usage included

The chat goes through this server so the browser talks to one origin (no CORS on `lmforge serve`). Nothing here
touches a tensor or writes to the ledger. Every error is {"error": {"message", "param"}}: 400 bad input, 404
unknown run or route, 502 when `lmforge serve` cannot be reached, and the serve's own status (400, 429, 503) with its
message when it refuses a chat.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

import httpx
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.dashboard.data import CHART_METRICS, LedgerView
from lmforge.errors import LmforgeError

STATIC = Path(__file__).parent / "static"
METRIC_NAME = re.compile(r"[\w./-]{1,128}")  # what the ledger's writers use: loss, val_bpb, hellaswag/acc
MAX_METRIC_NAMES = 16
# connect: a local server answers at once; read: a request may wait in the serve queue (30 s by default) and then
# generate for a while before its next chunk
SERVE_TIMEOUT = httpx.Timeout(connect=5.0, read=300.0, write=30.0, pool=5.0)


class APIError(Exception):
    """An error response: status, one-line message, the offending parameter."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "param": self.param}}, status_code=self.status)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=100_000)


class ChatRequest(BaseModel):
    """POST /api/chat: the conversation so far and the playground's sampling settings."""
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    messages: list[ChatMessage] = Field(min_length=1, max_length=200)
    temperature: float = Field(0.8, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(128, ge=1, le=8192)


def create_app(ledger_path: Path, serve_url: str = "http://127.0.0.1:8000/v1") -> FastAPI:
    """The dashboard for the ledger at `ledger_path`; the playground chats with the OpenAI-compatible `serve_url`."""
    serve_url = serve_url.rstrip("/")
    view = LedgerView(ledger_path)
    http = httpx.AsyncClient(timeout=SERVE_TIMEOUT)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await http.aclose()
        view.close()

    app = FastAPI(title="lmforge dashboard", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no route {request.url.path}; the API is under /api/runs, /api/serve and /api/chat",
                   405: f"{request.url.path} does not take {request.method}"}.get(e.status_code, str(e.detail))
        return APIError(e.status_code, message).response()

    @app.exception_handler(RequestValidationError)
    async def bad_query(request: Request, e: RequestValidationError) -> JSONResponse:
        error = e.errors()[0]
        name = str(error["loc"][-1])
        return APIError(400, f"{name}: {error['msg']} (got {error.get('input')!r})", name).response()

    @app.get("/")
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/api/runs")
    def runs(limit: int = Query(100, ge=1, le=10_000)) -> JSONResponse:
        return JSONResponse({"ledger": str(view.ledger.path), "runs": view.runs(limit)})

    @app.get("/api/runs/{ref}")
    def run(ref: str) -> JSONResponse:
        return JSONResponse(jsonable(find_run(view, ref)))

    @app.get("/api/runs/{ref}/metrics")
    def metrics(ref: str, since: int = Query(-1, ge=-1), names: str = ",".join(CHART_METRICS)) -> JSONResponse:
        wanted = tuple(dict.fromkeys(n.strip() for n in names.split(",") if n.strip()))
        bad = next((n for n in wanted if not METRIC_NAME.fullmatch(n)), None)
        if not wanted or bad is not None or len(wanted) > MAX_METRIC_NAMES:
            raise APIError(400, f"names: give 1 to {MAX_METRIC_NAMES} comma-separated metric names of letters, "
                                f"digits and ._/- (got {names[:80]!r})", "names")
        run_id = find_run(view, ref)["id"]
        return JSONResponse({"run": run_id, "since": since, **view.metrics(run_id, since, wanted)})

    @app.get("/api/serve")
    async def serve_status() -> JSONResponse:
        return JSONResponse({"url": serve_url, "model": await served_model(http, serve_url)})

    @app.post("/api/chat")
    async def chat(request: Request) -> Response:
        body = parse_chat(await request.body())
        model = await served_model(http, serve_url)
        payload = {"model": model, "messages": [m.model_dump() for m in body.messages],
                   "temperature": body.temperature, "top_p": body.top_p, "max_tokens": body.max_tokens,
                   "stream": True, "stream_options": {"include_usage": True}}
        try:
            upstream = await http.send(http.build_request("POST", f"{serve_url}/chat/completions", json=payload),
                                       stream=True)
        except httpx.HTTPError as e:
            raise unreachable(serve_url, e) from None
        if upstream.status_code != 200:
            text = (await upstream.aread()).decode("utf-8", "replace")
            await upstream.aclose()
            raise APIError(upstream.status_code, f"lmforge serve refused the chat ({upstream.status_code}): "
                                                 f"{error_message(text)}")
        return StreamingResponse(relay(upstream), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


def find_run(view: LedgerView, ref: str) -> dict[str, Any]:
    try:
        return view.run(ref)
    except LmforgeError as e:
        raise APIError(404, str(e), "run") from None


def parse_chat(body: bytes) -> ChatRequest:
    """The chat request in `body`; a 400 naming the first bad field otherwise."""
    try:
        return ChatRequest.model_validate_json(body)
    except ValidationError as e:
        error = e.errors(include_url=False)[0]
        field = ".".join(str(part) for part in error["loc"])
        if error["type"] == "json_invalid":
            raise APIError(400, f"the request body is not valid JSON: {error['ctx']['error']}") from None
        got = repr(error["input"])
        raise APIError(400, f"{field or 'body'}: {error['msg']} (got {got[:60] + '...' if len(got) > 60 else got})",
                       field or None) from None


async def served_model(http: httpx.AsyncClient, serve_url: str) -> str:
    """The model id the serve URL offers (GET /models); APIError 502 when there is no server there."""
    try:
        response = await http.get(f"{serve_url}/models")
    except httpx.HTTPError as e:
        raise unreachable(serve_url, e) from None
    try:
        return response.json()["data"][0]["id"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise APIError(502, f"{serve_url}/models answered {response.status_code} without a model "
                            f"({error_message(response.text)}); is --serve-url an `lmforge serve` /v1 URL?") from None


def unreachable(serve_url: str, e: httpx.HTTPError) -> APIError:
    return APIError(502, f"cannot reach lmforge serve at {serve_url} ({type(e).__name__}: {e}); start it with "
                         f"`lmforge serve --ckpt RUN`, or give its URL to `lmforge dashboard --serve-url`")


def error_message(text: str) -> str:
    """The message of an OpenAI error object in `text`, else the text's start."""
    try:
        return str(json.loads(text)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return text[:200] or "an empty body"


async def relay(upstream: httpx.Response) -> AsyncIterator[bytes]:
    """The serve's server-sent events as they arrive; a server that dies mid-reply ends the stream with an error
    event, in the serve's own format. Closing (also when the browser goes away) closes the upstream request,
    which the serve notices and cancels."""
    try:
        async for chunk in upstream.aiter_raw():
            yield chunk
    except httpx.HTTPError as e:
        error = {"error": {"message": f"lmforge serve stopped mid-reply ({type(e).__name__}: {e})", "param": None}}
        yield f"data: {json.dumps(error)}\n\n".encode()
    finally:
        await upstream.aclose()


def jsonable(value: Any) -> Any:
    """`value` with NaN and infinities as None, which JSON cannot carry (summaries may hold a NaN loss)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value
