"""Text normalisation for the guard: undo the cheap tricks that hide a phrase from a keyword list.

`normalize(text)` gives the text every rule is matched against: Unicode NFKC, casefolded, invisible characters
removed, look-alike letters (Cyrillic, Greek, small capitals, enclosed letters) mapped to ASCII, accents dropped
from Latin letters and whitespace runs turned into one space. It keeps, for every character it outputs, the
offset of the original character it came from, so a match in the normalised text is reported in ORIGINAL offsets.

`obfuscation_views(normalized)` adds further views of the same text, each with its own offsets, built in one
chain (each step applies to the previous step's main result):

    collapsed   single letters split by one space . - _ or *  ("b o m b", "b.o.m.b") joined up
    leet        0->o 1->i (and 1->l) 3->e 4->a 5->s 7->t @->a $->s !->i inside words; real numbers stay numbers
    squeezed    runs of 3+ identical letters cut to one ("kiiiill" -> "kill") and to two ("killlll" -> "kill")

`decodings(text)` finds text hidden in an encoding: base64 and hex runs, and URL-encoded stretches; `rot13` is a
view of the normalised text (it maps letters one to one, so its offsets are exact).

Limits. All of it is linear in the input: on one CPU core, normalising 1 MB takes about 0.03 s when it is ASCII
and 0.2 s when it is not, and each further view about as long again.
  * every regex here is free of nested quantifiers, and each match is examined in O(its length);
  * a view is only built when its trick is present (a cheap search decides), so a plain text has one view;
  * at most MAX_DECODED runs per encoding are decoded, each at most MAX_RUN characters long; decoded text is not
    decoded again (base64 inside base64 is not unwrapped).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
import unicodedata
import urllib.parse
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

MAX_DECODED = 64  # runs decoded per encoding: enough for any real prompt, bounded for a hostile one
MAX_RUN = 65_536  # longest single base64/hex run decoded (characters)
URL_CONTEXT = 256  # characters around URL escapes decoded with them ("how to make a %62omb" needs its context)


Spans = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Normalized:
    text: str  # the normalised text
    offsets: Sequence[int]  # offsets[i] = index in the original text of the character text[i] came from
    # Where (as original [start, end) spans) an obfuscation view differs from the plain normalisation, so a
    # caller can look only there; None for the plain normalisation and for views that differ everywhere (rot13).
    changed: Spans | None = None

    def span(self, start: int, end: int) -> tuple[int, int]:
        """The original [start, end) of the normalised [start, end)."""
        n = len(self.text)
        if n == 0:
            return (0, 0)
        first = self.offsets[start] if start < n else self.offsets[n - 1] + 1
        last = self.offsets[end - 1] + 1 if end > start else first
        return (first, last)


@dataclass(frozen=True)
class Decoding:
    name: str  # "base64", "hex" or "url"
    text: str  # the decoded text (not yet normalised)
    span: tuple[int, int]  # where the encoded run sits in the original text


# --- 1. one character at a time --------------------------------------------------------------------------------

# Characters that render as nothing (or as a blank) but split a word for a keyword matcher. Every format
# character (Unicode category Cf: U+200B..U+200F, U+2060..U+2064, U+FEFF, soft hyphen, bidi controls, tag
# characters U+E0000..U+E007F) is dropped by category; these are the invisible ones of other categories.
_INVISIBLE = set("\u034f\u115f\u1160\u17b4\u17b5\u180b\u180c\u180d\u180e\u180f\u3164\uffa0")
_INVISIBLE |= {chr(c) for c in range(0xFE00, 0xFE10)} | {chr(c) for c in range(0xE0100, 0xE01F0)}  # variation sel.

# Look-alikes NFKC leaves alone. Upper case is mapped before casefolding, so 'Н' (looks like H) and 'н' (a small
# capital H) can both become 'h', while Greek 'Η' is 'h' but 'η' is 'n'. A compact table in the spirit of
# Unicode's confusables.txt, limited to letters that pass for ASCII in common fonts.
_CONFUSABLES = {
    # Cyrillic
    "А": "a", "а": "a", "В": "b", "Е": "e", "е": "e", "Ё": "e", "ё": "e", "К": "k", "к": "k", "М": "m", "м": "m",
    "Н": "h", "н": "h", "О": "o", "о": "o", "Р": "p", "р": "p", "С": "c", "с": "c", "Т": "t", "т": "t",
    "У": "y", "у": "y", "Х": "x", "х": "x", "Ѕ": "s", "ѕ": "s", "І": "i", "і": "i", "Ї": "i", "ї": "i",
    "Ј": "j", "ј": "j", "Ԁ": "d", "ԁ": "d", "Ү": "y", "ү": "y", "Һ": "h", "һ": "h", "Ӏ": "l", "ӏ": "l",
    "Ԛ": "q", "ԛ": "q", "Ԝ": "w", "ԝ": "w", "Ь": "b", "Ꙇ": "i", "ꙇ": "i",
    # Greek
    "Α": "a", "α": "a", "Β": "b", "Ε": "e", "ε": "e", "Ζ": "z", "Η": "h", "η": "n", "Ι": "i", "ι": "i",
    "Κ": "k", "κ": "k", "Μ": "m", "Ν": "n", "ν": "v", "Ο": "o", "ο": "o", "Ρ": "p", "ρ": "p", "Τ": "t",
    "τ": "t", "Υ": "y", "υ": "u", "Χ": "x", "χ": "x", "ϲ": "c", "Ϲ": "c", "ϳ": "j", "ω": "w",
    # Armenian and Latin extensions that pass for ASCII letters
    "օ": "o", "ս": "u", "հ": "h", "ո": "n", "ɑ": "a", "ɡ": "g", "ı": "i", "ȷ": "j", "ʋ": "u", "ɩ": "i",
    # small capitals
    "ᴀ": "a", "ʙ": "b", "ᴄ": "c", "ᴅ": "d", "ᴇ": "e", "ꜰ": "f", "ɢ": "g", "ʜ": "h", "ɪ": "i", "ᴊ": "j",
    "ᴋ": "k", "ʟ": "l", "ᴍ": "m", "ɴ": "n", "ᴏ": "o", "ᴘ": "p", "ʀ": "r", "ꜱ": "s", "ᴛ": "t", "ᴜ": "u",
    "ᴠ": "v", "ᴡ": "w", "ʏ": "y", "ᴢ": "z",
    # typographic quotes, so a rule can write "someone's" once
    "\u2018": "'", "\u2019": "'", "\u02bc": "'", "\u201c": '"', "\u201d": '"',
}
# Letter-shaped symbols with no decomposition: regional indicators (🇦) and negative circled/squared letters (🅐 🅰).
for _first in (0x1F1E6, 0x1F150, 0x1F170):
    _CONFUSABLES.update({chr(_first + i): chr(ord("a") + i) for i in range(26)})


def _to_ascii(s: str) -> str:
    return "".join(_CONFUSABLES.get(ch, ch) for ch in s)


@lru_cache(maxsize=65_536)
def _fold(c: str) -> tuple[str, bool]:
    """(what one non-ASCII or control character becomes, whether it is a combining mark)."""
    if c.isspace():
        return " ", False
    category = unicodedata.category(c)
    if category in ("Cf", "Cc") or c in _INVISIBLE:
        return "", False
    if category in ("Mn", "Me"):
        return c, True
    s = _to_ascii(_to_ascii(unicodedata.normalize("NFKC", c)).casefold())  # again: casefold makes new lowercase
    out: list[str] = []
    for ch in s:
        if unicodedata.combining(ch) and out and out[-1].isascii():
            continue  # e.g. the dot casefold leaves on 'İ' -> 'i' + U+0307
        if not ch.isascii():  # a Latin letter with an accent becomes its base letter: "é" -> "e"
            decomposed = unicodedata.normalize("NFKD", ch)
            if decomposed[0].isascii() and all(unicodedata.combining(x) for x in decomposed[1:]):
                ch = decomposed[0]
        out.append(ch)
    return "".join(out), False


# Anything that is not printable ASCII, and runs of spaces: the places where normalize() has to look closer.
_SPECIAL = re.compile(r"[^\x20-\x7e]+| {2,}")


def normalize(text: str) -> Normalized:
    """NFKC, casefold, invisible characters dropped, look-alikes to ASCII, whitespace runs to one space."""
    if not _SPECIAL.search(text):  # plain printable ASCII: lower() is all there is to do
        return Normalized(text.lower(), range(len(text)))
    pieces: list[str] = []
    offsets = array("q")
    last = ""  # the last character written: decides whether a space or a combining mark is kept
    pos = 0
    for m in _SPECIAL.finditer(text):
        if m.start() > pos:  # the printable ASCII before this match
            chunk = text[pos:m.start()].lower()
            skip = 1 if chunk[0] == " " and last == " " else 0
            pieces.append(chunk[skip:])
            offsets.extend(range(pos + skip, m.start()))
            last = chunk[-1] if len(chunk) > skip else last
        for i in range(m.start(), m.end()):
            folded, mark = _fold(text[i])
            if mark and last.isascii() and last.isalpha():
                continue  # an accent or zalgo mark on a Latin letter
            for ch in folded:
                if ch == " " and last == " ":
                    continue
                pieces.append(ch)
                offsets.append(i)
                last = ch
        pos = m.end()
    if pos < len(text):
        chunk = text[pos:].lower()
        skip = 1 if chunk[0] == " " and last == " " else 0
        pieces.append(chunk[skip:])
        offsets.extend(range(pos + skip, len(text)))
    return Normalized("".join(pieces), offsets)


# --- 2. views that undo obfuscation ----------------------------------------------------------------------------


def _span_of(view: Normalized, start: int, end: int) -> tuple[int, int]:
    return (view.offsets[start], view.offsets[end - 1] + 1)


def _keep(view: Normalized, regex: re.Pattern, kept) -> Normalized | None:
    """A new view of `view` in which each match of `regex` is replaced by the characters at `kept(match)`, a list
    of indices into view.text (a subsequence of the match); None when nothing changes."""
    pieces: list[str] = []
    offsets = array("q")
    changed: list[tuple[int, int]] = []
    pos = 0
    for m in regex.finditer(view.text):
        keep = kept(m)
        if len(keep) == m.end() - m.start():
            continue
        changed.append(_span_of(view, m.start(), m.end()))
        pieces.append(view.text[pos:m.start()])
        offsets.extend(view.offsets[pos:m.start()])
        pieces.append("".join(view.text[i] for i in keep))
        offsets.extend(view.offsets[i] for i in keep)
        pos = m.end()
    if not changed:
        return None
    pieces.append(view.text[pos:])
    offsets.extend(view.offsets[pos:])
    return Normalized("".join(pieces), offsets, (view.changed or ()) + tuple(changed))


# Three or more single letters/digits, each followed by one separator: "b o m b", "b.o.m.b", "b-o-m-b". Every
# repetition checks that its character stands alone, so a failed match never backtracks further than one step.
_SPACED = re.compile(r"(?<![a-z0-9])[a-z0-9](?![a-z0-9])(?:[ ._*-][a-z0-9](?![a-z0-9])){2,}")


def _collapse(view: Normalized) -> list[Normalized]:
    """'b o m b' -> 'bomb'. A second variant keeps a leading or trailing 'a'/'i' apart, since 'make a b o m b' and
    's t e a l a car' are more likely 'a bomb' and 'steal a' than 'abomb' and 'steala'. Spaced-out words that
    touch ('m a k e s a r i n') become one word: without a dictionary there is no telling where they split."""
    if not _SPACED.search(view.text):
        return []

    def joined(m: re.Match) -> list[int]:
        return list(range(m.start(), m.end(), 2))

    def articles_apart(m: re.Match) -> list[int]:
        keep = joined(m)
        text = view.text
        if len(keep) >= 4 and text[m.start()] in "ai" and text[m.start() + 1] == " ":
            keep.insert(1, m.start() + 1)
        if len(keep) >= 4 and text[m.end() - 1] in "ai" and text[m.end() - 2] == " ":
            keep.insert(len(keep) - 1, m.end() - 2)
        return keep

    return [v for v in (_keep(view, _SPACED, joined), _keep(view, _SPACED, articles_apart)) if v is not None]


_LEET_I = str.maketrans("013457@$!", "oieastasi")
_LEET_L = str.maketrans("013457@$!", "oleastasi")
_LEET_CHARS = "013457@$!"
_LEET_HINT = re.compile(r"[a-z][013457@$!]|[013457@$!][a-z]")
# Words that hold a leet character. A word is only entered at its first character, so a long run of letters is
# walked once, not once per position.
_LEET_WORD = re.compile(r"(?<![a-z0-9@$!])[a-z0-9@$!]*[013457@$!][a-z0-9@$!]*")
_WORD_CHAR = re.compile(r"[a-z0-9@$!]")


def _leet(view: Normalized) -> list[Normalized]:
    """Leetspeak decoded inside words. A word with letters and leet characters ("k1ll", "h4ck", "$ex") is decoded,
    except trailing symbols ("kill!"); a word of leet digits only ("4", "70" in "h0w 70 m4k3 4 b0mb") is decoded
    only next to such a word, so "I have 2 kids, 1 is 5" keeps its numbers. Leet maps one character to one, so
    the offsets do not change. Two variants: 1 -> i, and 1 -> l when a decoded word has a 1."""
    text = view.text
    if not _LEET_HINT.search(text):
        return []
    words = []  # (start, end of the part to decode, kind): 1 = letters and leet characters, 2 = leet only
    for m in _LEET_WORD.finditer(text):
        core = m.group().rstrip("@$!")
        if not core.strip(_LEET_CHARS + "26789"):  # no letter: a number, decoded only next to a leet word
            kind = 2 if not core.strip(_LEET_CHARS) else 0
        else:
            kind = 1 if any(ch in _LEET_CHARS for ch in core) else 0
        words.append((m.start(), m.start() + len(core), kind))

    def next_to_word(i: int) -> bool:  # is a neighbouring word (nothing but separators between) a leet word?
        before = i > 0 and words[i - 1][2] == 1 and not _WORD_CHAR.search(text, words[i - 1][1], words[i][0])
        after = i + 1 < len(words) and words[i + 1][2] == 1 and not _WORD_CHAR.search(text, words[i][1],
                                                                                        words[i + 1][0])
        return before or after

    decode = [(start, end) for i, (start, end, kind) in enumerate(words)
              if end > start and (kind == 1 or (kind == 2 and next_to_word(i)))]
    if not decode:
        return []
    changed = (view.changed or ()) + tuple(_span_of(view, start, end) for start, end in decode)
    views = []
    for table in (_LEET_I, _LEET_L):
        pieces, pos = [], 0
        for start, end in decode:
            pieces += [text[pos:start], text[start:end].translate(table)]
            pos = end
        pieces.append(text[pos:])
        views.append(Normalized("".join(pieces), view.offsets, changed))
        if not any("1" in text[start:end] for start, end in decode):
            break
    return views


_REPEATED = re.compile(r"([a-z])\1{2,}")


def _squeeze(view: Normalized) -> list[Normalized]:
    """'kiiiill' -> 'kill' (runs of three or more to one) and 'killlll' -> 'kill' (to two); a word with a double
    letter and a stretched one ('kiiiilllll') is missed."""
    if not _REPEATED.search(view.text):
        return []
    one = _keep(view, _REPEATED, lambda m: [m.start()])
    two = _keep(view, _REPEATED, lambda m: [m.start(), m.start() + 1])
    return [v for v in (one, two) if v is not None]


def obfuscation_views(normalized: Normalized) -> list[tuple[str, Normalized]]:
    """[("normalized", the text itself), then (name, view) for every trick found]: collapsed, leet, squeezed.
    Each step works on the first view of the step before, so "b 0 m b" is collapsed, then leet-decoded."""
    views = [("normalized", normalized)]
    seen = {normalized.text}
    current = normalized
    for name, step in (("collapsed", _collapse), ("leet", _leet), ("squeezed", _squeeze)):
        made = []
        for v in step(current):
            if v.text not in seen:
                seen.add(v.text)
                made.append(v)
                views.append((name, v))
        if made:
            current = made[0]
    return views


def rot13(normalized: Normalized) -> Normalized:
    """The normalised text rot13'ed: letters map one to one, so the offsets stay exact."""
    return Normalized(codecs.encode(normalized.text, "rot13"), normalized.offsets)


# --- 3. encodings ----------------------------------------------------------------------------------------------

_BASE64 = re.compile(r"[A-Za-z0-9+/_-]{16,}={0,2}")
_HEX = re.compile(r"[0-9A-Fa-f]{16,}|(?:\\x[0-9A-Fa-f]{2}){8,}|(?:[0-9A-Fa-f]{2} ){7,}[0-9A-Fa-f]{2}")
_URL_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")


def _printable(data: bytes) -> str | None:
    """The UTF-8 text in `data` if it is mostly printable (what a hidden instruction looks like); else None."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    good = sum(ch.isprintable() or ch in "\n\r\t" for ch in text)
    letters = sum(ch.isalpha() for ch in text)
    return text if text and good >= 0.95 * len(text) and letters >= 0.5 * len(text) else None


def _from_base64(run: str) -> str | None:
    if len(run) % 4 or len(run) > MAX_RUN:
        return None  # base64 comes in groups of four characters, padding included
    urlsafe = "-" in run or "_" in run
    if urlsafe and ("+" in run or "/" in run):
        return None
    try:
        data = base64.b64decode(run, altchars=b"-_" if urlsafe else None, validate=True)
    except (binascii.Error, ValueError):
        return None
    return _printable(data)


def _from_hex(run: str) -> str | None:
    digits = run.replace("\\x", "").replace(" ", "")
    if len(digits) % 2 or len(digits) > MAX_RUN:
        return None
    return _printable(bytes.fromhex(digits))


def decodings(text: str) -> list[Decoding]:
    """Text hidden in `text`: base64 runs (16+ characters, whole groups of four, decoding to printable UTF-8),
    hex runs (16+ digits, or 8+ bytes written \\xNN or 'NN NN', decoding to printable UTF-8), and URL-encoded
    text (the stretch from URL_CONTEXT characters before the first %xx escape to as far after the last one, in
    one piece while escapes are closer than that). At most MAX_DECODED of each, in order."""
    found: list[Decoding] = []
    for name, regex, decode in (("base64", _BASE64, _from_base64), ("hex", _HEX, _from_hex)):
        count = 0
        for m in regex.finditer(text):
            decoded = decode(m.group())
            if decoded is not None:
                found.append(Decoding(name, decoded, (m.start(), m.end())))
                count += 1
                if count == MAX_DECODED:
                    break
    stretches: list[list[int]] = []
    for m in _URL_ESCAPE.finditer(text):
        if stretches and m.start() - stretches[-1][1] <= URL_CONTEXT:
            stretches[-1][1] = m.end()
        elif len(stretches) == MAX_DECODED:
            break
        else:
            stretches.append([m.start(), m.end()])
    for start, end in stretches:
        start, end = max(0, start - URL_CONTEXT), min(len(text), end + URL_CONTEXT)
        decoded = urllib.parse.unquote_plus(text[start:end])
        if decoded != text[start:end]:
            found.append(Decoding("url", decoded, (start, end)))
    return found


def decoded_views(text: str) -> list[tuple[str, str]]:
    """(encoding, decoded text) for every encoding found in `text`, plus ("rot13", the text rot13'ed), which is
    always cheap and always included."""
    return [(d.name, d.text) for d in decodings(text)] + [("rot13", codecs.encode(text, "rot13"))]


# --- 4. readings for a classifier ------------------------------------------------------------------------------

READING_CHARS = 4096  # texts up to this long (every prompt) also get their obfuscation views and rot13 read
READING_CONTEXT = 120  # characters kept on each side of a decoded run: the wrapper that says what to do with it
MAX_READINGS = 8  # texts a classifier reads for one text, the text itself included
# A leet character between two letters ("k1ll", "h4ck", "b0mb"): leetspeak, where "mp3", "1960s" or "5k" are not.
# A classifier reads the leet views only of texts that have one; "mp3" read as "mpe" is noise, not a disguise.
_LEET_INSIDE = re.compile(r"[a-z][013457@$!]+[a-z]")
# Common English words: a rot13 view that holds more of them than the text itself is the text's real reading.
_COMMON_WORDS = re.compile(r"\b(the|and|to|of|a|in|is|you|that|it|for|on|with|are|how|what|my|me|i|do|can|make|"
                           r"write|tell|give|help|your|this|from|by|will|get|about|should|would|want|need|steps|"
                           r"someone|people|into|without|best|way|kill|find|him|her|them)\b")


def readings(text: str) -> list[str]:
    """What a classifier should read to judge `text`: the text itself first, then each version of it with an
    obfuscation undone (at most MAX_READINGS in all, no two alike), so that a request hidden by a trick is read
    as the plain request it is:

        normalized   look-alike letters and invisible characters folded (only when that changes more than case)
        views        spaced-out letters joined, leetspeak decoded, stretched letters squeezed (obfuscation_views;
                     the leet and squeezed ones only when a leet character sits between two letters)
        rot13        the text rot13'ed, when that holds more common English words than the text does
        decoded      each base64 / hex / URL-encoded run decoded in place, with READING_CONTEXT characters of
                     the text around it (the wrapper: "decode this and answer: ...")

    Views and rot13 are built only for texts up to READING_CHARS long; a longer text gets its decoded runs only
    (a classifier reads a long text in windows, and every extra reading multiplies that cost)."""
    out = [text]

    def add(reading: str) -> None:
        if len(out) < MAX_READINGS and reading.strip() and reading not in out:
            out.append(reading)

    if len(text) <= READING_CHARS:
        normalized = normalize(text)
        if normalized.text != " ".join(text.lower().split()):
            add(normalized.text)
        for name, view in obfuscation_views(normalized)[1:]:
            if name == "collapsed" or _LEET_INSIDE.search(normalized.text):
                add(view.text)
        rotated = codecs.encode(normalized.text, "rot13")
        common = len(_COMMON_WORDS.findall(rotated))
        if common >= 2 and common > len(_COMMON_WORDS.findall(normalized.text)):
            add(rotated)
    for decoding in decodings(text):
        start, end = decoding.span
        add(text[max(0, start - READING_CONTEXT):start] + decoding.text + text[end:end + READING_CONTEXT])
    return out
