"""Personal data and secrets found by pattern, and redaction that replaces them with readable tags.

PIIDetector finds e-mail addresses, phone numbers, payment card numbers (Luhn), IBANs (mod-97), IPv4/IPv6
addresses (the `ipaddress` module), US social security numbers and API keys/secrets with regular expressions,
checks each candidate where a check exists, and keeps the longest match where two overlap. It needs no model.
redact() works for any detector's Detections: "mail me at a@b.io" -> "mail me at <EMAIL>".

Decisions a reader may trip over:
- A dotted quad is an IPv4 address, so the version string "1.2.3.4" is redacted as one ("v1.2.3.4" is not).
- A national phone number (no "+") needs 10-11 digits in 3 or more groups, or an area code in parentheses:
  "415-555-2671", "(020) 7946 0958", "06 12 34 56 78". Dates, IPv4-shaped and thousands-grouped numbers are
  not phones; short local numbers ("555-2671") are not found.
- A card number must pass Luhn and start with a known issuer prefix (Visa, Mastercard, Amex, Discover, ...);
  a Luhn-valid number from no issuer is an order id more often than a card.
- "::1" and "1::2" are valid IPv6 but not reported: code is full of slices like x[1::2]. An IPv6 address is
  reported when written in full, or when it has two or more groups and one of them has four hex digits.

Time: bounded for any input. Every repetition nested in another is bounded and starts with a delimiter the inner
one cannot match (":" in IPv6, "." in e-mail domains) or has a fixed width (IBAN groups of four), so a string
matches in one way, or a few, and a failed attempt gives back at most what it read. Every pattern that can scan
a long run starts behind a lookbehind that excludes the run's own characters, so a run of letters or digits is
scanned from its first character only, not from each one.
A 1 MB text of adversarial runs ("1 1 1 ...", "a@a@...", "-----BEGIN ..." repeated) takes under a second on one
CPU core; texts with many real matches cost most, in the Python that checks each candidate.
"""

from __future__ import annotations

import bisect
import ipaddress
import re
from collections.abc import Callable, Iterable

from lmforge.errors import ConfigError
from lmforge.guard.core import Detection

PII_KINDS = {  # kind (what `kinds` accepts, any case) -> tag (the Detection's label; redaction writes <TAG>)
    "email": "EMAIL",
    "phone": "PHONE",
    "credit_card": "CREDIT_CARD",
    "iban": "IBAN",
    "ipv4": "IPV4",
    "ipv6": "IPV6",
    "us_ssn": "US_SSN",
    "secret": "SECRET",
}

# On overlapping matches of the same length and score, the earlier kind here wins.
_SPECIFICITY = ("secret", "credit_card", "iban", "us_ssn", "email", "ipv6", "ipv4", "phone")

Found = tuple[int, int, str, float]  # a checked match: (start, end, kind, score)
Check = Callable[[re.Match], tuple[int, int] | None]  # the span to report for a regex match, or None to reject it


def _whole(m: re.Match) -> tuple[int, int] | None:
    return m.span()


# ---------------------------------------------------------------------------------------------------------------
# e-mail: local part and labels bounded by the RFC 5321 limits (64, 63), so one attempt reads at most a few hundred
# characters; the lookbehind starts the local part at the beginning of its run only.

EMAIL = re.compile(r"""
    (?<![A-Za-z0-9._%+-])
    [A-Za-z0-9._%+-]{1,64}
    @
    [A-Za-z0-9-]{1,63} (?:\.[A-Za-z0-9-]{1,63}){0,8}    # domain labels
    \.[A-Za-z]{2,24}                                     # top-level domain
    (?![A-Za-z0-9-])
""", re.VERBOSE | re.ASCII)


# ---------------------------------------------------------------------------------------------------------------
# phone: "+CC" then groups, or national groups. The regex only finds digit groups; _check_phone decides.

PHONE = re.compile(r"""
    (?<![\w+.-])                                   # not the tail of a word or a longer number
    (?=[+(\d][\d()\ .-]{8})                        # at least nine characters a phone is made of
    (?:
        \+\d{8,15}                                 # compact E.164: +14155552671
      |
        (?:\+\d{1,3}(?:[ .-]|(?=\()))?             # country code, then a separator or "("
        (?:\(\d{1,5}\)|\d{1,8}(?!\)))              # first group: (area) or digits, not "1)" of a list
        (?: [ .-]?\(\d{1,5}\)                      # further groups, each behind its separator ...
          | [ .-]\d{1,8}
          | (?<=\))\d{1,8}                         # ... or straight after ")": +44 (0)20
        ){0,6}
    )
    (?![\w(]|[.-]\d)                               # and not the head of one
""", re.VERBOSE | re.ASCII)

_DIGIT_RUN, _SEPARATOR = re.compile(r"\d+", re.ASCII), re.compile(r"[ .-]")


def _looks_like_date(groups: list[str]) -> bool:
    """2024-01-15, 15.01.2024 or 01-15-2024 at the start of the groups."""
    if len(groups) < 3:
        return False
    a, b, c = (int(g) for g in groups[:3])
    if len(groups[0]) == 4 and len(groups[1]) <= 2 and len(groups[2]) <= 2:
        return 1 <= b <= 12 and 1 <= c <= 31  # year, month, day
    if len(groups[0]) <= 2 and len(groups[1]) <= 2 and len(groups[2]) == 4:
        return 1 <= min(a, b) <= 12 and max(a, b) <= 31  # day and month in either order, year
    return False


def _check_phone(m: re.Match) -> tuple[int, int] | None:
    s = m.group()
    groups = _DIGIT_RUN.findall(s)
    digits = sum(len(g) for g in groups)
    if s.startswith("+"):
        return m.span() if 8 <= digits <= 15 else None  # E.164: at most 15 digits with the country code
    has_area = "(" in s
    if not 10 <= digits <= 11 or (len(groups) < 3 and not has_area):
        return None
    if any(len(g) == 1 for g in groups[1:]):  # ISBNs (0-306-40615-2), not phones, end in a one-digit group
        return None
    if not has_area:
        seps = set(_SEPARATOR.findall(s))
        if seps == {"."} and len(groups) == 4 and all(len(g) <= 3 for g in groups):
            return None  # 192.168.1.100: an IPv4 address
        if len(groups[0]) <= 3 and all(len(g) == 3 for g in groups[1:]) and len(seps) == 1:
            return None  # 1 234 567 890: a number with thousands separators
        if _looks_like_date(groups):
            return None  # 2024-01-15 123: a date and a number
    return m.span()


# ---------------------------------------------------------------------------------------------------------------
# payment cards: 13-19 digits, run together or in groups of 4 (4-4-4-4, Amex 4-6-5, Diners 4-6-4, 4-4-4-4-3).

CREDIT_CARD = re.compile(r"""
    (?<![\w-])
    (?: \d{13,19}
      | \d{4}(?:[ -]\d{4,6}){2,4}(?:[ -]\d{1,4})?
    )
    (?!\w)
""", re.VERBOSE | re.ASCII)

_IIN_RANGES = (  # (lowest, highest) leading digits of card issuers' identification numbers (ISO/IEC 7812)
    ("4", "4"),  # Visa
    ("50", "69"),  # Maestro, Mastercard 51-55, Discover 60/64/65, UnionPay 62
    ("2200", "2204"),  # Mir
    ("2221", "2720"),  # Mastercard 2-series
    ("34", "34"), ("37", "37"),  # American Express
    ("300", "305"), ("36", "36"), ("38", "39"),  # Diners Club
    ("3528", "3589"),  # JCB
    ("81", "81"),  # UnionPay
)


def luhn_ok(digits: str) -> bool:
    """The Luhn mod-10 check every payment card number passes: double every second digit from the right."""
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = int(c) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def _check_card(m: re.Match) -> tuple[int, int] | None:
    # Try the whole match, then without its last group: "4111 1111 1111 1111 2 times" is a card and a count.
    s, start = m.group(), m.start()
    if " " in s and "-" in s:
        return None  # mixed spaces and dashes: not how a card is written
    for end in _group_ends(s):
        digits = "".join(_DIGIT_RUN.findall(s, 0, end))
        if 13 <= len(digits) <= 19 and luhn_ok(digits) and _known_iin(digits):
            return start, start + end
    return None


def _known_iin(digits: str) -> bool:
    return any(lo <= digits[:len(lo)] <= hi for lo, hi in _IIN_RANGES)


def _group_ends(s: str) -> list[int]:
    """Where each prefix of whole groups of `s` ends, longest first: "ab cd ef" -> [8, 5, 2]."""
    return [len(s)] + [i for i in range(len(s) - 1, 0, -1) if s[i] in " -"]


# ---------------------------------------------------------------------------------------------------------------
# IBAN: country code, two check digits, then up to 30 letters/digits, run together or in groups of four.

IBAN = re.compile(r"""
    (?<![A-Za-z0-9])
    [A-Z]{2}\d{2}
    (?:\ ?[A-Z0-9]{4}){2,7}
    (?:\ ?[A-Z0-9]{1,4})?
    (?![A-Za-z0-9])
""", re.VERBOSE | re.ASCII)


def iban_ok(iban: str) -> bool:
    """ISO 13616 mod-97: move the first four characters to the end, read letters as 10..35; the number % 97 == 1."""
    s = iban.replace(" ", "")
    if not 15 <= len(s) <= 34:  # Norway's are the shortest, Saint Lucia's the longest
        return False
    return int("".join(str(int(c, 36)) for c in s[4:] + s[:4])) % 97 == 1


def _check_iban(m: re.Match) -> tuple[int, int] | None:
    # Try the whole match, then fewer groups: "GB82 WEST 1234 5698 7654 32 EUR" is an IBAN and a currency.
    s, start = m.group(), m.start()
    for end in _group_ends(s):
        if iban_ok(s[:end]):
            return start, start + end
    return None


# ---------------------------------------------------------------------------------------------------------------
# IP addresses: the regex finds the shape, the ipaddress module decides (octets 0-255, one "::" at most, ...).

IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\w|\.\d)", re.ASCII)

IPV6 = re.compile(r"""
    (?<![\w:])
    (?:[0-9A-Fa-f]{0,4}:){2,7}                     # groups, each ending in ":" (empty ones make the "::")
    (?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{1,4})?  # last group, or an embedded IPv4: ::ffff:192.0.2.1
    (?![\w:]|\.\w)
""", re.VERBOSE | re.ASCII)


def _check_ipv4(m: re.Match) -> tuple[int, int] | None:
    try:
        ipaddress.IPv4Address(m.group())
    except ValueError:  # an octet over 255, or a leading zero
        return None
    return m.span()


def _check_ipv6(m: re.Match) -> tuple[int, int] | None:
    s = m.group()
    try:
        ipaddress.IPv6Address(s)
    except ValueError:  # times (12:30:45), MAC addresses, two "::"
        return None
    groups = [g for g in s.split(":") if g]
    full = len(groups) == 8 or (len(groups) == 7 and "." in s)
    return m.span() if full or (len(groups) >= 2 and any(len(g) == 4 or "." in g for g in groups)) else None


# ---------------------------------------------------------------------------------------------------------------
# US social security numbers: AAA-GG-SSSS; never issued: area 000, 666 or 9xx, group 00, serial 0000.

US_SSN = re.compile(r"(?<![\w-])(?!000|666|9)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\w-]|\.\d)", re.ASCII)


# ---------------------------------------------------------------------------------------------------------------
# secrets: keys with a vendor prefix (the whole key is reported), and keyword assignments (the value only).

SECRETS = {  # what -> pattern; every body is unbounded but behind a lookbehind excluding its own characters
    "aws_access_key_id": r"(?<![A-Za-z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Za-z0-9])",
    "github_token": r"(?<![A-Za-z0-9_])(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})(?![A-Za-z0-9_])",
    "slack_token": r"(?<![A-Za-z0-9-])xox[abpr]-[A-Za-z0-9-]{10,}",
    "openai_key": r"(?<![A-Za-z0-9_-])sk-[A-Za-z0-9_-]{20,}",
    "google_api_key": r"(?<![A-Za-z0-9_-])AIza[0-9A-Za-z_-]{35}(?![A-Za-z0-9_-])",
    "stripe_key": r"(?<![A-Za-z0-9_])(?:sk|rk)_(?:live|test)_[0-9A-Za-z]{16,}",
    "jwt": r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]*",
    # The body cannot contain "-----", so an attempt stops at the next marker: repeated BEGINs cost linear time.
    "private_key": r"""-----BEGIN\ (?:[A-Z0-9]{1,10}\ ){0,3}PRIVATE\ KEY(?:\ BLOCK)?-----
                       (?:[^-]|-(?!----)){1,65536}
                       -----END\ (?:[A-Z0-9]{1,10}\ ){0,3}PRIVATE\ KEY(?:\ BLOCK)?-----""",
}

SECRET_ASSIGNMENT = re.compile(r"""
    (?<![A-Za-z])                                  # client_secret and AWS_SECRET_ACCESS_KEY count, secretary not
    (?:api[\ _-]?key|secret(?:[_-]?(?:access[_-]?)?key)?|token|password|passwd)
    ["']?[\ \t]{0,8}[:=][\ \t]{0,8}
    (?: "(?P<dq>[^"\n]{8,})"                       # quoted: the text inside the quotes
      | '(?P<sq>[^'\n]{8,})'
      | (?P<bare>[^\s"'`&]{8,})                    # bare: up to a space, quote or & (URL query strings)
    )
""", re.VERBOSE | re.ASCII | re.IGNORECASE)

_CODE_VALUE = re.compile(r"[A-Za-z_][\w.]*[(\[]|\$|\{\{", re.ASCII)  # f(x), os.environ[...], $VAR, {{ var }}


def _check_prefixed_secret(m: re.Match) -> tuple[int, int] | None:
    if m.group().startswith("sk-") and not any(c.isdigit() for c in m.group()):
        return None  # random keys have digits; "sk-learn-is-a-library-name" has none
    return m.span()


def _check_assignment(m: re.Match) -> tuple[int, int] | None:
    name = next(g for g in ("dq", "sq", "bare") if m.group(g) is not None)
    start, end = m.span(name)
    if name == "bare":
        value = m.group(name).rstrip(".,;:)")  # sentence punctuation after the value is not part of it
        if _CODE_VALUE.match(value):
            return None  # token = tokenizer.encode(text): code, not a secret
        end = start + len(value)
    return (start, end) if end - start >= 8 else None


# ---------------------------------------------------------------------------------------------------------------

_RULES: list[tuple[str, re.Pattern, float, Check]] = [  # (kind, pattern, score, check)
    ("email", EMAIL, 0.9, _whole),
    ("phone", PHONE, 0.8, _check_phone),
    ("credit_card", CREDIT_CARD, 1.0, _check_card),
    ("iban", IBAN, 1.0, _check_iban),
    ("ipv4", IPV4, 0.9, _check_ipv4),
    ("ipv6", IPV6, 0.9, _check_ipv6),
    ("us_ssn", US_SSN, 0.9, _whole),
    *[("secret", re.compile(p, re.VERBOSE | re.ASCII), 0.9, _check_prefixed_secret) for p in SECRETS.values()],
    ("secret", SECRET_ASSIGNMENT, 0.8, _check_assignment),
]


class PIIDetector:
    """Finds personal data and secrets by pattern; `kinds` picks from PII_KINDS (default: all)."""

    name = "pii"

    def __init__(self, kinds: Iterable[str] | None = None):
        if isinstance(kinds, str):  # kinds="email" means one kind, not five letters
            kinds = [kinds]
        chosen = list(PII_KINDS) if kinds is None else [k.lower() for k in kinds]
        unknown = [k for k in chosen if k not in PII_KINDS]
        if unknown:
            raise ConfigError(f"unknown PII kind(s) {unknown}; choose from {sorted(PII_KINDS)}")
        self.kinds = tuple(k for k in PII_KINDS if k in chosen)
        self._rules = [rule for rule in _RULES if rule[0] in self.kinds]

    def detect(self, text: str) -> list[Detection]:
        # 1. every checked match of every rule
        found: list[Found] = []
        for kind, pattern, score, check in self._rules:
            for m in pattern.finditer(text):
                span = check(m)
                if span is not None:
                    found.append((*span, kind, score))
        # 2. where matches overlap keep the longest, then the surest, then the most specific
        kept = _drop_overlaps(found)
        return [Detection("pii", score, (start, end), self.name, PII_KINDS[kind])
                for start, end, kind, score in kept]


def _drop_overlaps(found: list[Found]) -> list[Found]:
    """The non-overlapping subset, sorted by start; O(n log n), cluster by cluster of chain-overlapping matches."""
    def rank(f: Found) -> tuple[int, float, int]:
        return -(f[1] - f[0]), -f[3], _SPECIFICITY.index(f[2])

    kept: list[Found] = []
    found = sorted(found)
    i = 0
    while i < len(found):
        # 1. the cluster: the matches from i on that overlap the ones before them
        j, end = i + 1, found[i][1]
        while j < len(found) and found[j][0] < end:
            end = max(end, found[j][1])
            j += 1
        # 2. best first, keep each match that overlaps none kept so far (chosen stays sorted and disjoint)
        chosen: list[Found] = []
        for f in sorted(found[i:j], key=rank):
            k = bisect.bisect_left(chosen, f)
            if (k == 0 or chosen[k - 1][1] <= f[0]) and (k == len(chosen) or f[1] <= chosen[k][0]):
                chosen.insert(k, f)
        kept += chosen
        i = j
    return kept


def redact(text: str, detections: list[Detection]) -> str:
    """`text` with each detection's span replaced by <LABEL> (<REDACTED> without a label).

    Spans that overlap are merged into one tag, the label of the longest of them, so "<EMAIL>" never shows up
    half-covered by "<SECRET>". Detections without a span (about the text as a whole) and empty spans are skipped.
    """
    spans = []
    for d in detections:
        if d.span is None or d.span[0] == d.span[1]:
            continue
        start, end = d.span
        if not 0 <= start < end <= len(text):
            raise ValueError(f"detection span {d.span} from {d.detector!r} is outside a text of {len(text)} "
                             f"characters; redact the text it was detected in")
        spans.append((start, end, d.label or "REDACTED"))
    spans.sort()
    parts, pos, i = [], 0, 0
    while i < len(spans):
        start, end, label = spans[i]
        longest = end - start
        i += 1
        while i < len(spans) and spans[i][0] < end:  # merge everything that overlaps the run so far
            s, e, lab = spans[i]
            if e - s > longest:
                longest, label = e - s, lab
            end = max(end, e)
            i += 1
        parts += [text[pos:start], f"<{label}>"]
        pos = end
    parts.append(text[pos:])
    return "".join(parts)
