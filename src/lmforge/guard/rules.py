"""The rules detector: keyword and regex lists per hazard category, matched after normalisation and decoding.

    detector = RulesDetector.from_file()            # the shipped lists, guard/assets/rules.yaml
    detector = RulesDetector.from_file("my.yaml")   # {category: {keywords: [...], patterns: [...]}}
    detector.detect("How do I make a pipe bomb?")   # [Detection("indiscriminate_weapons", 1.0, (9, 25), "rules")]

A text is matched as it is normalised (guard/normalize.py: case, look-alike letters, invisible characters), then
through each view that undoes an obfuscation (spaced-out letters, leetspeak, stretched letters, rot13) and each
text hidden in an encoding (base64, hex, URL-encoding). A category gets one Detection, the best: score 1.0 for a
hit in the normalised text, OBFUSCATED_SCORE for a hit that only a view or a decoding revealed. Its span is the
first hit's, in the original text's offsets; a hit inside a decoded base64, hex or URL-encoded run spans the
whole run (the decoded text has no offsets of its own).

Keywords are phrases matched on word boundaries; patterns are regexes compiled once. Both are matched on the
normalised text, so patterns are written in lower-case ASCII.

Speed. Running a few hundred regexes over every position of every view would cost seconds per megabyte, so each
regex first goes through a prefilter (the idea of RE2's FilteredRE2): from its parse tree we take the literal
strings any match must contain (an AND of OR-sets: "how to" or "help me"..., and "kill" or "murder"...). One scan
per view finds where those strings occur, 4 KiB chunk by chunk; a regex then runs only on the chunks that hold
all of its strings. A plain text costs one scan plus the few regexes whose words it uses; a text built to contain
every word of every rule costs what running every regex costs, which is still linear for the shipped patterns
(no nested quantifiers; gaps are bounded). A match is found only if it is at most MAX_MATCH characters long (the
shipped rules' longest possible match is a few hundred characters); a user's own pattern can be as slow as
Python's regex engine makes it.
"""

from __future__ import annotations

import bisect
import codecs
import difflib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lmforge.errors import ConfigError
from lmforge.guard.core import CATEGORIES, Detection
from lmforge.guard.normalize import (
    Normalized,
    decodings,
    normalize,
    obfuscation_views,
    rot13,
)

try:  # the regex parser, to read the literals out of a pattern (a private module, stable since Python 2)
    from re import _parser as _sre_parse  # Python >= 3.11
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _sre_parse

DEFAULT_RULES = Path(__file__).parent / "assets" / "rules.yaml"
OBFUSCATED_SCORE = 0.9  # a hit only an obfuscation or decoding view shows: nearly as sure, and a policy can tell
RULE_KEYS = ("keywords", "patterns")
CHUNK = 4096  # prefilter granularity: a regex runs on the 4 KiB chunks that hold all its literals
MAX_MATCH = 1024  # longest match the chunked search finds (chunk windows overlap by this much)
MIN_LITERAL = 3  # shorter literals ("a ", "to") occur everywhere and filter nothing
LARGE = 32_768  # texts longer than this match obfuscation views only near what they changed (see _views)
FOCUS = 512  # characters of context kept around such a change: longer than any shipped rule's match


@dataclass(frozen=True)
class RuleSet:
    keywords: tuple[str, ...] = ()  # phrases, matched whole-word after normalisation
    patterns: tuple[str, ...] = ()  # regexes over the normalised (lower-case) text


def _keyword_regex(keywords: tuple[str, ...], where: str) -> re.Pattern | None:
    """One regex for a category's keywords: each normalised like the text, bounded by non-word characters where
    it starts or ends with a word character (so 'fork bomb' does not match 'forkbomber' but ':(){' needs none)."""
    alternatives = []
    for i, keyword in enumerate(keywords):
        if not isinstance(keyword, str) or not normalize(keyword).text.strip():
            raise ConfigError(f"{where}.keywords[{i}] must be a non-empty phrase, got {keyword!r}")
        phrase = normalize(keyword).text.strip()
        before = r"(?<!\w)" if re.match(r"\w", phrase) else ""
        after = r"(?!\w)" if re.search(r"\w$", phrase) else ""
        alternatives.append(before + re.escape(phrase) + after)
    if not alternatives:
        return None
    alternatives.sort(key=len, reverse=True)  # longest first, so the reported span is the longest phrase
    return re.compile("|".join(dict.fromkeys(alternatives)))


def _pattern_regex(pattern: Any, where: str) -> re.Pattern:
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError(f"{where} must be a non-empty regex string, got {pattern!r}")
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"{where} {pattern!r} is not a valid regex ({e}); fix it (in YAML, single-quote "
                          "patterns so backslashes stay as written)") from None
    # Upper-case letters outside escapes (\S, \W) and group names can never match the lower-cased text.
    literal = re.sub(r"\\.|\(\?P<\w+>|\(\?P=\w+\)", "", pattern)
    if re.search(r"[A-Z]", literal):
        raise ConfigError(f"{where} {pattern!r} has upper-case letters, but rules match the lower-cased text; "
                          "write the pattern in lower case")
    if regex.fullmatch(""):
        raise ConfigError(f"{where} {pattern!r} matches the empty string, so it would flag every text; "
                          "make it require at least one character")
    return regex


def _unknown_category(name: Any, where: str) -> ConfigError:
    valid = list(CATEGORIES)
    close = difflib.get_close_matches(str(name), valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{where}: unknown category {name!r}{hint}; valid: {', '.join(valid)}")


# --- the prefilter ---------------------------------------------------------------------------------------------

Needs = list[frozenset[str]]  # every set must have one of its strings in a match (an AND of OR-sets)
Window = tuple[int, int, set[str]]  # [start, end) of a text and the literals found in it


def _needs(pattern: str) -> Needs:
    """The literal strings a match of `pattern` must contain; [] when nothing is certain (the regex always runs)."""
    try:
        parsed = _sre_parse.parse(pattern)
    except Exception:  # noqa: BLE001 - a private parser: when in doubt, filter nothing
        return []
    if parsed.state.flags & re.IGNORECASE:
        return []
    return _sequence_needs(parsed)


def _sequence_needs(items) -> Needs:
    c = _sre_parse
    needs: Needs = []
    run: list[str] = []  # consecutive literal characters

    def flush() -> None:
        if len(run) >= MIN_LITERAL:
            needs.append(frozenset(["".join(run)]))
        run.clear()

    for op, av in items:
        if op is c.LITERAL:
            run.append(chr(av))
            continue
        if op in (c.AT, c.ASSERT, c.ASSERT_NOT):
            continue  # zero width (\b, lookarounds): the literals on either side are adjacent in the match
        flush()
        if op is c.SUBPATTERN and not av[1] & re.IGNORECASE:
            needs += _sequence_needs(av[-1])
        elif op in (c.MAX_REPEAT, c.MIN_REPEAT) and av[0] >= 1:
            needs += _sequence_needs(av[2])
        elif op is c.BRANCH:
            choices = [_most_selective(_sequence_needs(alternative)) for alternative in av[1]]
            if all(choices):
                needs.append(frozenset().union(*choices))
    flush()
    return needs


def _selectivity(strings: frozenset[str]) -> tuple[int, int]:
    return (min(map(len, strings)), -len(strings))  # longer literals, then fewer of them, are rarer


def _most_selective(needs: Needs) -> frozenset[str] | None:
    return max(needs, key=_selectivity, default=None)


def _ordered(needs: Needs) -> Needs:
    """Most selective first, so a window that lacks a literal is dismissed after one set test."""
    return sorted(set(needs), key=_selectivity, reverse=True)


def _trie_regex(strings: Sequence[str]) -> str:
    """One regex matching the longest of `strings` at a position: a trie, so the engine does not try each string."""
    trie: dict = {}
    for string in strings:
        node = trie
        for ch in string:
            node = node.setdefault(ch, {})
        node[""] = {}  # a string ends here

    def build(node: dict) -> str:
        parts = [re.escape(ch) + build(child) for ch, child in sorted(node.items()) if ch]
        if not parts:
            return ""
        body = parts[0] if len(parts) == 1 else "(?:" + "|".join(parts) + ")"
        return f"(?:{body})?" if "" in node else body  # greedy: the longer string is tried first

    return build(trie)


class _Prefilter:
    """Finds, in one scan of a text, which of the literals the regexes need each window of it holds."""

    def __init__(self, needs: list[Needs]):
        strings = sorted({s for need in needs for strings in need for s in strings})
        known = set(strings)
        # A scan finds the longest literal at each position; the shorter ones starting there are its prefixes.
        self.prefixes = {s: [s[:k] for k in range(MIN_LITERAL, len(s)) if s[:k] in known] for s in strings}
        self.prefixes = {s: p for s, p in self.prefixes.items() if p}
        self.finder = re.compile(f"(?=({_trie_regex(strings)}))") if strings else None

    def scan(self, text: str, ranges: Sequence[tuple[int, int]] | None = None) -> list[Window]:
        """The search windows of `text` (of `ranges` of it, when given) with the literals each holds. A window is
        a CHUNK and the MAX_MATCH characters after it, so a match that starts in the chunk and runs over its end
        is still found there."""
        windows: list[Window] = []
        if self.finder is None:
            return windows
        for first, last in ranges or [(0, len(text))]:
            for start in range(first, last, CHUNK):
                end = min(last, start + CHUNK + MAX_MATCH)
                found = set(self.finder.findall(text, start, end))
                for string in found & self.prefixes.keys():
                    found.update(self.prefixes[string])
                if found:
                    windows.append((start, end, found))
        return windows


def _search(regex: re.Pattern, needs: Needs, text: str, windows: list[Window],
            ranges: Sequence[tuple[int, int]] | None) -> re.Match | None:
    """The first match of `regex` in `text`: in the windows that hold all its literals, or, for a regex with no
    certain literal, in all of `ranges` (None: the whole text)."""
    if needs:
        spans = [(start, end) for start, end, present in windows
                 if not any(strings.isdisjoint(present) for strings in needs)]
    else:
        spans = ranges or [(0, len(text))]
    for start, end in spans:
        while (m := regex.search(text, start, end)) is not None:
            # A match that ends at a cut may lean on it (a \b or lookahead there): check it against the whole text.
            if m.end() < end or end == len(text) or regex.match(text, m.start()):
                return m
            start = m.start() + 1
    return None


# --- the detector ----------------------------------------------------------------------------------------------


def _compile(rules: dict[str, RuleSet], source: str) -> list[tuple[str, list[re.Pattern]]]:
    """category -> its keyword regex, then its patterns. ConfigError for an unknown category, an empty keyword
    or a pattern that does not compile."""
    compiled = []
    for category, ruleset in rules.items():
        if category not in CATEGORIES:
            raise _unknown_category(category, source)
        where = f"{source}: {category}"
        keywords = _keyword_regex(ruleset.keywords, where)
        patterns = [_pattern_regex(p, f"{where}.patterns[{i}]") for i, p in enumerate(ruleset.patterns)]
        compiled.append((category, ([keywords] if keywords else []) + patterns))
    return compiled


class RulesDetector:
    name = "rules"

    def __init__(self, rules: dict[str, RuleSet], source: str = "<rules>"):
        self.rules = rules
        # category -> [(regex, the literals a match of it contains)]
        self._compiled = [(category, [(regex, _ordered(_needs(regex.pattern))) for regex in regexes])
                          for category, regexes in _compile(rules, source)]
        self._prefilter = _Prefilter([needs for _, regexes in self._compiled for _, needs in regexes])

    @classmethod
    def from_file(cls, path: str | Path | None = None) -> RulesDetector:
        """The rules in a YAML file; None for the shipped lists."""
        path = DEFAULT_RULES if path is None else Path(path)
        return cls(load_rules(path), source=str(path))

    def detect(self, text: str) -> list[Detection]:
        """One Detection per category that a keyword or pattern hits, with its best score and first span."""
        best: dict[str, tuple[float, tuple[int, int]]] = {}
        for score, view, run_span, ranges in _views(text):
            pending = [(c, rx) for c, rx in self._compiled if c not in best or best[c][0] < score]
            if not pending:
                break  # views come best score first: nothing left to improve
            windows = self._prefilter.scan(view.text, ranges)
            for category, regexes in pending:
                for regex, needs in regexes:
                    m = _search(regex, needs, view.text, windows, ranges)
                    if m:
                        span = view.span(m.start(), m.end()) if run_span == "exact" else run_span
                        best[category] = (score, span)
                        break
        return [Detection(c, best[c][0], best[c][1], self.name) for c, _ in self._compiled if c in best]


def _views(text: str) -> Iterator[tuple[float, Normalized, tuple[int, int] | str, list[tuple[int, int]] | None]]:
    """(score, view, span, ranges) for every view of `text`, best score first. The span is "exact" when the view's
    own offsets lead back to `text`, else the original span of the encoded run the view was decoded from. Ranges
    (None: all of it) are the parts of the view worth matching. Built lazily: a detector that has found
    everything stops before the decodings are computed.

    A text longer than LARGE characters has its obfuscation views matched only within FOCUS characters of what
    they changed (the rest is the plain text, already matched), and its rot13 views only near words that read as
    common English once rot13'ed; shorter texts (every prompt) have every view matched whole."""
    normalized = normalize(text)
    large = len(normalized.text) > LARGE
    for name, view in obfuscation_views(normalized):
        score = 1.0 if name == "normalized" else OBFUSCATED_SCORE
        yield score, view, "exact", _focus(view, view.changed) if large and view.changed else None
    rotated = rot13(normalized)
    english = tuple(normalized.span(*m.span()) for m in _ROT13_WORDS.finditer(normalized.text)) if large else ()
    if not large or english:
        for _, view in obfuscation_views(rotated):
            yield OBFUSCATED_SCORE, view, "exact", _focus(view, english + (view.changed or ())) if large else None
    for decoding in decodings(text):
        for _, view in obfuscation_views(normalize(decoding.text)):
            yield OBFUSCATED_SCORE, view, decoding.span, None


# Common English words as rot13 writes them ("ubj gb" = "how to"), leaving out words whose rot13 is a word too.
_ENGLISH = ("the and to of a in is you that it for on with are how what my me i do can make write tell give help "
            "kill your this from by will get about should would want need steps guide someone people into without")
_ROT13_WORDS = re.compile(r"\b(" + "|".join(codecs.encode(w, "rot13") for w in _ENGLISH.split()) + r")\b")


def _focus(view: Normalized, spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]] | None:
    """The ranges of `view` within FOCUS characters of `spans` (original offsets), cut at spaces so no word is
    split; None (all of it) when they would cover most of it."""
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start - FOCUS <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end + FOCUS)
        else:
            merged.append([start - FOCUS, end + FOCUS])
    text, ranges = view.text, []
    for start, end in merged:
        a, b = bisect.bisect_left(view.offsets, start), bisect.bisect_right(view.offsets, end)
        space = text.rfind(" ", max(0, a - 64), a)  # a cut inside a word would make a \b where there is none
        a = space + 1 if space >= 0 else a
        space = text.find(" ", b, b + 64)
        ranges.append((a, space if space >= 0 else b))
    return None if sum(b - a for a, b in ranges) > len(text) // 2 else ranges


def rules_from_dict(raw: Any, source: str = "<dict>") -> dict[str, RuleSet]:
    """Validated RuleSets from parsed YAML `{category: {keywords: [...], patterns: [...]}}`; a one-line
    ConfigError naming the first bad category, key, keyword or pattern."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: rules must be a mapping of category -> {{keywords: [...], patterns: [...]}}, "
                          f"got {type(raw).__name__}")
    rules = {}
    for category, body in raw.items():
        if category not in CATEGORIES:
            raise _unknown_category(category, source)
        where = f"{source}: {category}"
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise ConfigError(f"{where} must be a mapping like {{keywords: [...], patterns: [...]}}, "
                              f"got {type(body).__name__}")
        for key in body:
            if key not in RULE_KEYS:
                close = difflib.get_close_matches(str(key), RULE_KEYS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"{where}: unknown key {key!r}{hint}; valid: {', '.join(RULE_KEYS)}")
        lists = {}
        for key in RULE_KEYS:
            value = body.get(key) or []
            if not isinstance(value, list):
                raise ConfigError(f"{where}.{key} must be a list, got {type(value).__name__}; "
                                  f"write it as '{key}: [a, b]' or one '- item' per line")
            lists[key] = tuple(value)
        rules[category] = RuleSet(lists["keywords"], lists["patterns"])
    _compile(rules, source)  # bad keywords and patterns raise here, naming the file
    return rules


def load_rules(path: str | Path | None = None) -> dict[str, RuleSet]:
    """The RuleSets in a YAML rules file (None: the shipped one); ConfigError for a missing file, bad YAML, an
    unknown category or key, or a pattern that does not compile."""
    path = DEFAULT_RULES if path is None else Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"rules file {path} not found; give the path of a YAML rules file, or 'builtin' "
                          "for the shipped one") from None
    except OSError as e:
        raise ConfigError(f"cannot read rules file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"rules file {path} is not UTF-8 (byte {e.start}); re-save it as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"rules file {path} is not valid YAML{at} ({getattr(e, 'problem', e)}); "
                          "fix the syntax (single-quote regexes)") from None
    return rules_from_dict(raw, str(path))
