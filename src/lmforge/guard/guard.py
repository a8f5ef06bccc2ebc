"""The guard: a policy's detectors run over a text, and the policy turns what they find into one verdict.

    guard = Guard.from_policy("my_policy.yaml")       # or Guard.from_policy() for the shipped default
    verdict = guard.check("text", direction="input")  # or "output"
    verdict.action                                    # "allow", "flag", "redact" or "block"
    verdict.text                                      # the text to pass on (redacted when the action is redact)

Each detection whose score reaches its category's threshold becomes a Finding with the action the policy sets
for that category in that direction; the verdict takes the strongest. Redaction replaces the spans of the
findings that redact with <TAG> (e.g. <EMAIL>); a redact finding with no span (a whole-text classifier) cannot
be redacted and blocks instead. Texts over the policy's max_chars are blocked unread, so checking time is bounded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import ConfigError
from lmforge.guard.core import Detection, Detector
from lmforge.guard.pii import PIIDetector, redact
from lmforge.guard.policy import DIRECTIONS, Policy, load_policy, strongest
from lmforge.guard.rules import RulesDetector


@dataclass(frozen=True)
class Finding:
    category: str
    score: float
    detector: str
    span: tuple[int, int] | None
    action: str  # what the policy does about it in this direction: flag, redact or block
    label: str | None = None  # what redaction writes in place of the span, e.g. "EMAIL"


@dataclass(frozen=True)
class Verdict:
    direction: str
    action: str  # the strongest action of the findings; "allow" when there are none
    findings: tuple[Finding, ...]
    text: str  # the text to pass on: redacted when action is "redact", else the text checked
    seconds: float

    @property
    def blocked(self) -> bool:
        return self.action == "block"


def build_detectors(policy: Policy) -> list[Detector]:
    """The detectors a policy names, configured as it says."""
    detectors: list[Detector] = []
    for name, settings in policy.detectors.items():
        if name == "rules":
            source = settings.get("file", "builtin")
            detectors.append(RulesDetector.from_file(None if source == "builtin" else source))
        elif name == "pii":
            kinds = settings.get("kinds", "all")
            detectors.append(PIIDetector(None if kinds == "all" else kinds))
        elif name == "semantic":
            from lmforge.guard.semantic import (
                SemanticDetector,  # needs lmforge[guard]: imported only when used
            )
            head = settings.get("head", "builtin")
            # its own threshold is only a floor: the policy's per-category thresholds decide
            detectors.append(SemanticDetector(None if head == "builtin" else head,
                                              threshold=settings.get("threshold", 1e-6)))
        elif name == "external":
            from lmforge.guard.external import (
                HFClassifierDetector,
                LlamaGuardJudgeDetector,
            )
            if "model_dir" not in settings:
                raise ConfigError(f"{policy.source}: detectors.external needs model_dir (a local model folder)")
            kind = settings.get("kind", "classifier")
            if kind == "classifier":
                detectors.append(HFClassifierDetector(settings["model_dir"], settings.get("category_map"),
                                                      threshold=settings.get("threshold", 0.5)))
            elif kind == "llama_guard":
                detectors.append(LlamaGuardJudgeDetector(settings["model_dir"]))
            else:
                raise ConfigError(f"{policy.source}: detectors.external.kind must be classifier or llama_guard, "
                                  f"got {kind!r}")
    return detectors


def later_matches(detector: RulesDetector, text: str, first: Detection, limit: int = 1000) -> list[Detection]:
    """The matches of first's category after it (redaction must cover every one, not just the first)."""
    found, offset = [], first.span[1]
    while offset < len(text) and len(found) < limit:
        d = next((d for d in detector.detect(text[offset:]) if d.category == first.category and d.span), None)
        if d is None or d.span[1] == 0:
            break
        found.append(Detection(d.category, d.score, (d.span[0] + offset, d.span[1] + offset), d.detector, d.label))
        offset += d.span[1]
    return found


class Guard:
    def __init__(self, policy: Policy, detectors: list[Detector]):
        self.policy = policy
        self.detectors = detectors

    @classmethod
    def from_policy(cls, policy: Policy | str | Path | None = None) -> Guard:
        policy = policy if isinstance(policy, Policy) else load_policy(policy)
        return cls(policy, build_detectors(policy))

    def check(self, text: str, direction: str = "input") -> Verdict:
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        start = time.perf_counter()
        if len(text) > self.policy.max_chars:
            finding = Finding("oversize", 1.0, "limit", None, "block")
            return Verdict(direction, "block", (finding,), text, time.perf_counter() - start)
        findings: list[Finding] = []
        redactions: list[Detection] = []
        for detector in self.detectors:
            if not self.policy.runs_on(detector.name, direction):
                continue
            for d in detector.detect(text):
                rule = self.policy.rule(d.category)
                action = rule.action(direction)
                if d.score < rule.threshold or action == "allow":
                    continue
                found = [d]
                if action == "redact":
                    if d.span is None:  # nothing to cut out: the whole text is the problem
                        action = "block"
                    else:
                        if isinstance(detector, RulesDetector):  # it reports a category's first match only
                            found += later_matches(detector, text, d)
                        redactions += found
                findings += [Finding(f.category, f.score, f.detector, f.span, action, f.label) for f in found]
        action = strongest(f.action for f in findings)
        out = redact(text, redactions) if action == "redact" else text
        return Verdict(direction, action, tuple(findings), out, time.perf_counter() - start)
