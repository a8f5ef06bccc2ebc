"""Rails: the guard applied where a server needs it, on a request before it is queued and on text as it is generated.

    screen_input(guard, texts)  every text of one request (a prompt, or each chat message's content) checked as
                                input: block refuses the request; redact rewrites spans inside each text, so a chat
                                keeps its messages and roles
    OutputRail                  one generated text, checked as it grows: a chunk is released to the client only
                                after it has been checked together with the context before it; block ends the
                                generation (the caller answers with the policy's refusal), redact rewrites the
                                chunk on its way out
    audit_rows                  the ledger rows for a verdict: one per finding, with a sha256 of the text checked
                                (the text itself only when the policy sets store_text)

Output is read through a sliding window: each check covers the new chunk (policy `stream.chunk_chars`, or less
at the end) plus `stream.context_chars` of text already released, so a phrase split across two chunks is seen
whole. A chunk ends at a word boundary: the word being written (with any digit groups before it, as in a phone or
card number) waits for the next chunk, so an e-mail address or a number is checked whole before any of it is
sent. What a window catches that starts in released text cannot be unsent: redaction rewrites only the new chunk,
and a block stops the generation from there on. Nothing here knows about models or HTTP; serve/engine.py calls it.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass

from lmforge.guard.core import Detection
from lmforge.guard.guard import Finding, Guard, Verdict
from lmforge.guard.pii import redact
from lmforge.guard.policy import strongest

# the end of a text that may continue in the next chunk: the last word, and digit groups before it ("+1 415 55")
UNFINISHED_TAIL = re.compile(r"(?:[\d+(][\d()+\- ]*)?\S*\Z")
MAX_HELD_CHARS = 64  # a longer unbroken run is released anyway (no pattern the guard knows is that long)


@dataclass(frozen=True)
class ScreenedInput:
    verdict: Verdict  # all texts together: the strongest action, every finding; .text is the texts joined
    texts: list[str]  # each text as it may reach the model (redacted where the policy redacts)


def screen_input(guard: Guard, texts: list[str]) -> ScreenedInput:
    """Check each of one request's texts as input; the request gets the strongest action of any of them."""
    verdicts = [guard.check(text, "input") for text in texts]
    verdict = Verdict("input", strongest(v.action for v in verdicts), tuple(f for v in verdicts for f in v.findings),
                      "\n".join(texts), sum(v.seconds for v in verdicts))
    return ScreenedInput(verdict, [v.text for v in verdicts])


@dataclass(frozen=True)
class Released:
    """What an output check lets out: `text` to send, unless the action is block (send the refusal, stop)."""
    text: str
    action: str  # the strongest action on the unreleased part
    findings: list[Finding]  # found by this check and not before (spans in window coordinates)
    window: str  # the text checked, for the audit
    seconds: float

    @property
    def blocked(self) -> bool:
        return self.action == "block"


class OutputRail:
    """The output rail of one generated text. The caller owns the text and what it has released so far."""

    def __init__(self, guard: Guard):
        self.guard = guard
        self.chunk_chars = guard.policy.stream.chunk_chars
        self.context_chars = guard.policy.stream.context_chars
        self.findings: list[Finding] = []  # every non-allow finding so far, each once
        self.seen: set[tuple] = set()
        self.seconds = 0.0

    def ready(self, text: str, start: int, end: int) -> int:
        """Where a chunk of text[start:end] may end while the text still grows: before its unfinished last word."""
        held = len(UNFINISHED_TAIL.search(text, start, end).group())
        return end - held if held <= MAX_HELD_CHARS else end

    def release(self, text: str, start: int, end: int, final: bool) -> Released | None:
        """Check the part not yet released, text[start:end], with the context before it; None while fewer than
        chunk_chars characters wait and the generation goes on (they wait for more). Callers end a chunk where
        `ready` says."""
        if not final and end - start < self.chunk_chars:
            return None
        begin = max(0, start - self.context_chars)
        window = text[begin:end]
        verdict = self.guard.check(window, "output")
        self.seconds += verdict.seconds
        new = start - begin  # where the unreleased part starts in the window
        # findings wholly inside released text were dealt with when it was released (redacted or let through)
        fresh = [f for f in verdict.findings if f.span is None or f.span[1] > new]
        first_seen = []
        for f in fresh:
            key = (f.category, f.detector, f.action, None if f.span is None else (f.span[0] + begin, f.span[1] + begin))
            if key not in self.seen:
                self.seen.add(key)
                first_seen.append(f)
        self.findings += first_seen
        action = strongest(f.action for f in fresh)
        if action == "block":
            return Released("", action, first_seen, window, verdict.seconds)
        piece = window[new:]
        if action == "redact":  # spans clipped to the unreleased part and moved to its coordinates
            spans = [Detection(f.category, f.score, (max(f.span[0], new) - new, f.span[1] - new), f.detector,
                               f.label) for f in fresh if f.action == "redact"]
            piece = redact(piece, spans)
        return Released(piece, action, first_seen, window, verdict.seconds)

    def verdict(self) -> Verdict:
        """Everything this rail found, as one verdict (the strongest action)."""
        return Verdict("output", strongest(f.action for f in self.findings), tuple(self.findings), "", self.seconds)


def audit_rows(direction: str, findings: list[Finding] | tuple[Finding, ...], text: str, request_id: str,
               store_text: bool) -> list[dict]:
    """Ledger rows (guard_events) for findings in `text`: what was found, by which detector, the action, and the
    text's sha256 (the text itself only with store_text)."""
    if not findings:
        return []
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    now = time.time()
    return [{"created_at": now, "request_id": request_id, "direction": direction, "category": f.category,
             "detector": f.detector, "score": f.score, "action": f.action, "text_sha256": digest,
             "text": text if store_text else None} for f in findings]

