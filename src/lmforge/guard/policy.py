"""The guard policy: which detectors run, and what happens per hazard category in each direction.

A policy is a YAML file (the shipped default is `guard/assets/default_policy.yaml`; start from a copy):

    refusal: "I can't help with that."     # what a blocked request or response is answered with
    store_text: false                      # audit rows keep a hash of the text, not the text, unless true
    max_chars: 200000                      # longer texts are blocked outright (bounded checking time)
    detectors:                             # which detectors run, with their settings
      rules: {file: builtin}               # keyword/regex lists (builtin = guard/assets/rules.yaml)
      pii: {kinds: all}                    # or a list: [EMAIL, PHONE, CREDIT_CARD, IBAN, IPV4, IPV6, US_SSN, SECRET]
      semantic: {head: builtin}            # sentence-embedding classifier (needs lmforge[guard])
                                           # any detector: directions: [input] to run it on prompts only
    stream: {chunk_chars: 32, context_chars: 160}  # the server's output rail: check every 32 new characters,
                                                   # with the 160 before them as context
    categories:                            # per category: action on input, action on output, score threshold
      violent_crimes: {input: block, output: block, threshold: 0.5}
      pii: {input: redact, output: redact}
      ...

Actions, strongest first: block (refuse), redact (replace the offending spans with <TAG>), flag (record and
let through), allow. A category left out of `categories` gets `default` (itself an entry like the others;
allow in both directions if absent). Every key is checked: an unknown one is a one-line ConfigError naming it and
the closest valid key.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from lmforge.errors import ConfigError
from lmforge.guard.core import CATEGORIES

ACTIONS = ("allow", "flag", "redact", "block")  # weakest to strongest
DIRECTIONS = ("input", "output")
DETECTORS = {  # detector -> the settings it takes (besides `directions`, which every detector takes)
    "rules": ("file",),
    "pii": ("kinds",),
    "semantic": ("head", "threshold"),
    "external": ("model_dir", "kind", "category_map", "threshold"),
}
TOP_KEYS = ("refusal", "store_text", "max_chars", "detectors", "categories", "default", "stream")
STREAM_KEYS = ("chunk_chars", "context_chars")
RULE_KEYS = ("input", "output", "threshold")



def strongest(actions) -> str:
    """The strongest of some actions; "allow" for none."""
    return max(actions, key=ACTIONS.index, default="allow")

@dataclass(frozen=True)
class CategoryRule:
    input: str = "allow"
    output: str = "allow"
    threshold: float = 0.5  # a detection counts when its score is at least this

    def action(self, direction: str) -> str:
        return self.input if direction == "input" else self.output


@dataclass(frozen=True)
class StreamSettings:
    """How the server's output rail reads a generation as it grows (guard/rails.py).

    Text reaches the client only once checked, so chunk_chars trades streaming smoothness (and checks per token)
    against latency: 32 characters is ~8 tokens of English or code. context_chars of already-checked text are
    checked again with each chunk, so a phrase that straddles two chunks is seen whole.
    """
    chunk_chars: int = 32
    context_chars: int = 160


@dataclass(frozen=True)
class Policy:
    refusal: str = "I can't help with that."
    store_text: bool = False
    max_chars: int = 200_000
    detectors: dict[str, dict[str, Any]] = field(default_factory=lambda: {"rules": {}, "pii": {}})
    categories: dict[str, CategoryRule] = field(default_factory=dict)
    default: CategoryRule = CategoryRule()
    stream: StreamSettings = StreamSettings()
    source: str = "<defaults>"  # the file it came from, for messages

    def rule(self, category: str) -> CategoryRule:
        return self.categories.get(category, self.default)

    def runs_on(self, detector: str, direction: str) -> bool:
        return direction in self.detectors.get(detector, {}).get("directions", DIRECTIONS)


def _unknown(kind: str, name: str, valid, where: str) -> ConfigError:
    close = difflib.get_close_matches(str(name), list(valid), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{where}: unknown {kind} {name!r}{hint}; valid: {', '.join(valid)}")


def _rule(value: Any, where: str, base: CategoryRule) -> CategoryRule:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping like {{input: block, output: block, threshold: 0.5}}")
    for key in value:
        if key not in RULE_KEYS:
            raise _unknown("key", key, RULE_KEYS, where)
    actions = {}
    for direction in DIRECTIONS:
        action = value.get(direction, getattr(base, direction))
        if action not in ACTIONS:
            raise ConfigError(f"{where}.{direction}: {action!r} is not an action; use one of {', '.join(ACTIONS)}")
        actions[direction] = action
    threshold = value.get("threshold", base.threshold)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
        raise ConfigError(f"{where}.threshold must be a number in 0..1, got {threshold!r}")
    return CategoryRule(actions["input"], actions["output"], float(threshold))


def policy_from_dict(raw: Any, source: str = "<dict>") -> Policy:
    """A validated Policy from parsed YAML; ConfigError naming the first bad key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a policy is a YAML mapping (refusal, detectors, categories, ...)")
    for key in raw:
        if key not in TOP_KEYS:
            raise _unknown("key", key, TOP_KEYS, source)
    refusal = raw.get("refusal", Policy.refusal)
    if not isinstance(refusal, str) or not refusal.strip():
        raise ConfigError(f"{source}: refusal must be a non-empty string")
    store_text = raw.get("store_text", False)
    if not isinstance(store_text, bool):
        raise ConfigError(f"{source}: store_text must be true or false, got {store_text!r}")
    max_chars = raw.get("max_chars", Policy.max_chars)
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or not 1 <= max_chars <= 10_000_000:
        raise ConfigError(f"{source}: max_chars must be an integer in 1..10000000, got {max_chars!r}")

    detectors = raw.get("detectors", {"rules": {}, "pii": {}})
    if not isinstance(detectors, dict) or not detectors:
        raise ConfigError(f"{source}: detectors must map at least one of {', '.join(DETECTORS)} to its settings")
    checked: dict[str, dict[str, Any]] = {}
    for name, settings in detectors.items():
        if name not in DETECTORS:
            raise _unknown("detector", name, DETECTORS, f"{source}: detectors")
        settings = settings or {}
        if not isinstance(settings, dict):
            raise ConfigError(f"{source}: detectors.{name} must be a mapping of settings (or empty)")
        for key in settings:
            if key not in DETECTORS[name] + ("directions",):
                raise _unknown("setting", key, DETECTORS[name] + ("directions",), f"{source}: detectors.{name}")
        directions = settings.get("directions", list(DIRECTIONS))
        if not isinstance(directions, list) or not directions or any(d not in DIRECTIONS for d in directions):
            raise ConfigError(f"{source}: detectors.{name}.directions must be a non-empty list of "
                              f"{' and '.join(DIRECTIONS)}, got {directions!r}")
        checked[name] = dict(settings, directions=tuple(directions))

    default = _rule(raw.get("default", {}), f"{source}: default", CategoryRule())
    categories_raw = raw.get("categories", {}) or {}
    if not isinstance(categories_raw, dict):
        raise ConfigError(f"{source}: categories must map category names to {{input, output, threshold}}")
    categories = {}
    for name, value in categories_raw.items():
        if name not in CATEGORIES:
            raise _unknown("category", name, CATEGORIES, f"{source}: categories")
        categories[name] = _rule(value, f"{source}: categories.{name}", default)
    return Policy(refusal.strip(), store_text, max_chars, checked, categories, default,
                  _stream(raw.get("stream", {}), source), source)


def _stream(value: Any, source: str) -> StreamSettings:
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: stream must be a mapping like {{chunk_chars: 32, context_chars: 160}}")
    for key in value:
        if key not in STREAM_KEYS:
            raise _unknown("key", key, STREAM_KEYS, f"{source}: stream")
    settings = {}
    for key, low in (("chunk_chars", 1), ("context_chars", 0)):
        v = value.get(key, getattr(StreamSettings, key))
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= 100_000:
            raise ConfigError(f"{source}: stream.{key} must be an integer in {low}..100000, got {v!r}")
        settings[key] = v
    return StreamSettings(**settings)


def load_policy(path: str | Path | None = None) -> Policy:
    """The policy in `path`, or the shipped default when None or 'builtin'."""
    if path is None or str(path) == "builtin":
        text = resources.files("lmforge.guard").joinpath("assets/default_policy.yaml").read_text(encoding="utf-8")
        return policy_from_dict(yaml.safe_load(text), "default_policy.yaml")
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"no policy file {path}; start from `lmforge guard policy > {path.name}`") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the policy {path}: {e}; give a UTF-8 YAML file") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"the policy {path} is not valid YAML{at}; fix the syntax") from None
    return policy_from_dict(raw, str(path))
