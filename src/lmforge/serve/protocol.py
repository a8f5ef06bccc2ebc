"""The OpenAI wire format: request models with their limits, conversion to SamplingParams, response bodies.

Requests are parsed strictly from the raw body (`parse_request`): JSON types must match (no "0.5" for a number, no
true for an integer), NaN and infinities are refused, and every limit lives on the field that it bounds, so a bad
value is a 400 naming that field before any arithmetic touches it. Defaults are OpenAI's: completions generate 16
tokens unless told otherwise, chat completions run to the end of the context.

Unknown top-level fields are IGNORED rather than refused: clients written for OpenAI or vLLM send fields this server
does not implement (`logit_bias`, `response_format`, `best_of`, `tools`, ...), and refusing them would break those
clients for options that mostly do not change the text. So that nobody is misled, every response to a request
with such fields carries the header `X-Lmforge-Ignored-Params: name,name` listing them. Unknown fields inside
messages or stream_options are dropped silently. `user` is accepted and ignored, as OpenAI documents it.

Extensions, under vLLM's names: `ignore_eos` (keep generating past the end-of-text token), and completions
`prompt` may be a list of token ids. Responses add `usage.lmforge` (FLOPs, device seconds, energy, queue time,
time to first token) next to OpenAI's token counts.

With a guard (`lmforge serve --guard POLICY`), every response carries the verdicts in a top-level `lmforge` field:

    "lmforge": {"guard": {"input":  {"action": "redact", "findings": [{"category": "pii", "detector": "pii",
                                                                       "score": 1.0, "action": "redact"}]},
                          "output": [{"index": 0, "action": "allow", "findings": []}]}}

`output` has one entry per choice. In a stream, the chunk that ends a choice (the one with its finish_reason)
carries `lmforge.guard` with the input verdict and that choice's output verdict (a list of one). A blocked request
or output is answered with the policy's refusal as the text and finish_reason "content_filter", as OpenAI does
when its own filter stops a completion. Findings never include the text they found.

Responses are plain dicts in OpenAI's shapes, built by the functions at the end of this file.
"""

from __future__ import annotations

import re
import urllib.parse
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lmforge.guard.guard import Verdict
from lmforge.serve.engine import MAX_STOP_CHARS, SamplingParams, TokenLogprob, Usage

MAX_IGNORED_NAMED = 20  # the ignored-params header names at most this many fields
IGNORED_PARAMS_HEADER = "X-Lmforge-Ignored-Params"
UNION_MEMBER = re.compile(r"str|int|float|bool|none|list\[.*\]|[A-Z]\w*")  # how pydantic names union members in locs


class RequestError(ValueError):
    """A request that does not parse or breaks a field's limit (HTTP 400); `param` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class _Request(BaseModel):
    """The fields completions and chat completions share."""
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    model: str = Field(max_length=256)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # 0 = off
    n: int = Field(1, ge=1, le=16)
    stop: list[str] = []  # a single string is taken as a list of one
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # what a torch.Generator accepts
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    user: str | None = None  # accepted and ignored (OpenAI: for abuse monitoring)

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, stop: Any) -> list[str]:
        stops = [stop] if isinstance(stop, str) else [] if stop is None else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ValueError("must be a string or a list of up to 4 strings")
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop strings, got {len(stops)}")
        if any(not 1 <= len(s) <= MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop strings must hold 1 to {MAX_STOP_CHARS} characters")
        return stops

    @property
    def ignored_params(self) -> list[str]:
        return list(self.model_extra or {})

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def _sampling(self, **kwargs: Any) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature, top_p=self.top_p,
            top_k=self.top_k, stop=tuple(self.stop), seed=self.seed, n=self.n,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            ignore_eos=self.ignore_eos, **kwargs)


class CompletionRequest(_Request):
    """POST /v1/completions."""
    prompt: str | list[int]
    max_tokens: int | None = Field(16, ge=0)  # None = to the end of the context
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False

    @field_validator("prompt", mode="plain")
    @classmethod
    def _one_prompt(cls, prompt: Any) -> str | list[int]:
        """A string or token ids, bare or as a batch of one; a batch of several is refused by name."""
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, list) and all(type(t) is int for t in prompt):
            return prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
            raise ValueError(f"this server takes one prompt per request, got a batch of {len(prompt)}; "
                             f"send them as separate requests")
        raise ValueError("must be a string, a list of token ids, or a list holding one of these")

    def sampling_params(self) -> SamplingParams:
        return self._sampling(max_tokens=self.max_tokens, logprobs=self.logprobs, echo=self.echo)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: str = Field(max_length=64)
    content: str | list[TextPart] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content: Any) -> Any:
        if content is not None and not isinstance(content, (str, list)):
            raise ValueError("must be a string or a list of text parts [{\"type\": \"text\", \"text\": ...}]")
        return content

    def as_dict(self) -> dict[str, str]:
        """{role, content} for the chat template; text parts joined by newlines (as vLLM does)."""
        content = self.content if isinstance(self.content, str) else \
            "\n".join(part.text for part in self.content or [])
        return {"role": self.role, "content": content}


class ChatRequest(_Request):
    """POST /v1/chat/completions."""
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)  # None = to the end of the context
    max_completion_tokens: int | None = Field(None, ge=0)  # OpenAI's newer name; wins over max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, top: int | None, info) -> int | None:
        if top is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return top

    def sampling_params(self, stop_token_ids: tuple[int, ...]) -> SamplingParams:
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self._sampling(max_tokens=max_tokens, logprobs=(self.top_logprobs or 0) if self.logprobs else None,
                              stop_token_ids=stop_token_ids)


def parse_request(body: bytes, model: type[_Request]) -> _Request:
    """The request in `body`; RequestError with a one-line message naming the bad field if it is not valid."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"the request body is not valid UTF-8 (byte {e.start}); send JSON encoded as UTF-8") \
            from None
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise validation_error(e) from None


def validation_error(e: ValidationError) -> RequestError:
    """The first problem pydantic found, as 'field: what is wrong (got value)'."""
    errors = e.errors(include_url=False)
    # of the failures of one field (one per member of a union), the one that got furthest says the most
    error = max((err for err in errors if err["loc"][:1] == errors[0]["loc"][:1]), key=lambda err: len(err["loc"]))
    loc = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"]
                  if not (isinstance(part, str) and UNION_MEMBER.fullmatch(part))).lstrip(".")
    if error["type"] == "json_invalid":
        return RequestError(f"the request body is not valid JSON: {error['ctx']['error']}")
    if not loc:
        return RequestError("the request body must be a JSON object")
    if error["type"] == "missing":
        return RequestError(f"missing required field '{loc}'", loc)
    message = str(error["ctx"]["error"]) if error["type"] == "value_error" else error["msg"]
    got = repr(error["input"])
    return RequestError(f"{loc}: {message} (got {got[:60] + '...' if len(got) > 60 else got})", loc)


def ignored_params_header(names: list[str]) -> str:
    """The header value naming ignored fields: percent-encoded where a name is not plain, capped in count."""
    shown = [urllib.parse.quote(name[:64], safe="") for name in names[:MAX_IGNORED_NAMED]]
    return ",".join(shown + ([f"...(+{len(names) - MAX_IGNORED_NAMED})"] if len(names) > MAX_IGNORED_NAMED else []))


# ---- response bodies ---------------------------------------------------------------------------------------


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def usage_body(usage: Usage) -> dict[str, Any]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
            "lmforge": {"flops": usage.flops, "device_seconds": usage.device_seconds,
                        "energy_joules": usage.energy_joules, "energy_measured": usage.energy_measured,
                        "queue_seconds": usage.queue_seconds, "time_to_first_token": usage.time_to_first_token}}


def verdict_body(verdict: Verdict | None) -> dict[str, Any]:
    if verdict is None:  # e.g. a choice the input rail refused: no output was checked
        return {"action": "allow", "findings": []}
    return {"action": verdict.action,
            "findings": [{"category": f.category, "detector": f.detector, "score": round(f.score, 4),
                          "action": f.action} for f in verdict.findings]}


def guard_body(input_verdict: Verdict, outputs: list[tuple[int, Verdict | None]]) -> dict[str, Any]:
    """The `lmforge` extension field: the input verdict and each listed choice's output verdict."""
    return {"guard": {"input": verdict_body(input_verdict),
                      "output": [{"index": i, **verdict_body(v)} for i, v in outputs]}}


def completion_logprobs(logprobs: list[TokenLogprob], offset: int) -> dict[str, Any]:
    """OpenAI's legacy logprobs object; `offset` is the character offset of the first token in the choice text."""
    offsets = []
    for lp in logprobs:
        offsets.append(offset)
        offset += len(lp.token)
    return {"tokens": [lp.token for lp in logprobs], "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [None if lp.logprob is None else {text: value for _, text, value in lp.top}
                             for lp in logprobs],
            "text_offset": offsets}


def chat_logprobs(logprobs: list[TokenLogprob]) -> dict[str, Any]:
    """The chat logprobs object; `bytes` are the UTF-8 of the token's text as decoded (U+FFFD for a partial
    character)."""
    return {"content": [{"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.token.encode()),
                         "top_logprobs": [{"token": text, "logprob": value, "bytes": list(text.encode())}
                                          for _, text, value in lp.top]}
                        for lp in logprobs]}


def completion_body(id: str, created: int, model: str, choices: list[dict[str, Any]],
                    usage: Usage | None, chunk: bool = False) -> dict[str, Any]:
    body = {"id": id, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if not chunk or usage is not None:
        body["usage"] = usage_body(usage) if usage is not None else None
    return body


def chat_body(id: str, created: int, model: str, choices: list[dict[str, Any]], usage: Usage | None,
              chunk: bool = False) -> dict[str, Any]:
    body = {"id": id, "object": "chat.completion.chunk" if chunk else "chat.completion", "created": created,
            "model": model, "choices": choices}
    if not chunk or usage is not None:
        body["usage"] = usage_body(usage) if usage is not None else None
    return body


def models_body(model_id: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                        "owned_by": "lmforge"}]}
