"""The guard's labelled prompt set (guard/assets/devset.jsonl) is well formed, big enough, and its held-out split is
held out: no held-out prompt repeats, or nearly repeats, a train prompt."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from lmforge.guard import core

DEVSET = Path(core.__file__).parent / "assets" / "devset.jsonl"
HAZARDS = sorted(set(core.CATEGORIES) - {"pii"})  # pii is found by pattern and has no prompts here
KINDS = {"harmful": {"plain", "obfuscated"}, "benign": {"lookalike", "everyday"}}
FIELDS = {"text", "label", "category", "split", "kind"}
# The first two blocks (lines 1-1632) were split 70/30; the third block, written later to train the semantic head,
# is train only (DEVSET.md), so the held-out share is checked on the first two.
SPLIT_BLOCKS_END = 1632
# Words too common to say two prompts are alike ("what's the difference between ..." is not a near-duplicate).
FILLER = {
    "the", "and", "for", "you", "your", "how", "what", "what's", "can", "with", "that", "this", "are", "who", "why",
    "when", "where", "which", "does", "should", "from", "into", "about", "give", "tell", "write", "make", "out",
    "get", "not", "its", "it's", "i'm", "don't", "there", "their", "they", "she", "her", "his", "him", "was",
    "will", "would", "could", "all", "any", "way", "best", "help",
}


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return [json.loads(line) for line in DEVSET.read_text(encoding="utf-8").splitlines()]


def normalised(text: str) -> str:
    return " ".join(text.lower().split())


def content_words(text: str) -> set[str]:
    return set(re.findall(r"[a-z']{3,}", text.lower())) - FILLER


def test_every_line_is_an_object_with_allowed_values(rows):
    for i, row in enumerate(rows, 1):
        assert set(row) == FIELDS, f"line {i}: fields {sorted(row)}"
        assert isinstance(row["text"], str) and row["text"].strip(), f"line {i}: empty text"
        assert row["label"] in KINDS, f"line {i}: label {row['label']!r}"
        assert row["kind"] in KINDS[row["label"]], f"line {i}: kind {row['kind']!r} for {row['label']}"
        assert row["split"] in {"train", "heldout"}, f"line {i}: split {row['split']!r}"
        expected = HAZARDS if row["label"] == "harmful" else [None]
        assert row["category"] in expected, f"line {i}: category {row['category']!r} for {row['label']}"


def test_every_hazard_has_enough_prompts_in_both_splits(rows):
    harmful = Counter((r["category"], r["split"]) for r in rows if r["label"] == "harmful")
    plain = Counter(r["category"] for r in rows if r["kind"] == "plain")
    for category in HAZARDS:
        assert plain[category] >= 30, f"{category}: {plain[category]} plain prompts"
        assert harmful[category, "heldout"] >= 8, f"{category}: {harmful[category, 'heldout']} held-out prompts"


def test_kinds_are_big_enough(rows):
    kinds = Counter(r["kind"] for r in rows)
    assert kinds["plain"] >= 420 and kinds["obfuscated"] >= 80
    assert kinds["lookalike"] >= 250 and kinds["everyday"] >= 150


def test_obfuscated_prompts_use_the_tricks_they_claim(rows):
    texts = [r["text"] for r in rows if r["kind"] == "obfuscated"]
    assert any("\u200b" in t for t in texts), "no zero-width characters"
    assert any(re.search("[\u0400-\u04ff]", t) for t in texts), "no Cyrillic homoglyphs"
    assert any(t.startswith("Decode this") or "base64" in t for t in texts), "no base64 requests"
    assert any("rot13" in t.lower() for t in texts), "no rot13 requests"


def test_heldout_is_about_thirty_percent_of_every_stratum(rows):
    split_rows = rows[:SPLIT_BLOCKS_END]
    strata = Counter((r["label"], r["category"], r["kind"]) for r in split_rows)
    heldout = Counter((r["label"], r["category"], r["kind"]) for r in split_rows if r["split"] == "heldout")
    for stratum, total in strata.items():
        assert 0.2 <= heldout[stratum] / total <= 0.4, f"{stratum}: {heldout[stratum]} of {total} held out"


def test_third_block_is_train_only(rows):
    assert all(r["split"] == "train" for r in rows[SPLIT_BLOCKS_END:])


def test_no_duplicate_texts(rows):
    repeated = [t for t, k in Counter(r["text"] for r in rows).items() if k > 1]
    assert not repeated, repeated[:5]


def test_no_heldout_text_repeats_a_train_text(rows):
    train = {normalised(r["text"]) for r in rows if r["split"] == "train"}
    leaked = [r["text"] for r in rows if r["split"] == "heldout" and normalised(r["text"]) in train]
    assert not leaked, leaked[:5]


def test_no_heldout_prompt_nearly_repeats_a_train_prompt(rows):
    # Obfuscated texts are skipped: their encodings and wrappers defeat word overlap (their base texts were written
    # apart, and held-out ones use wrappers no train one does).
    readable = [r for r in rows if r["kind"] != "obfuscated"]
    train = [content_words(r["text"]) for r in readable if r["split"] == "train"]
    for row in (r for r in readable if r["split"] == "heldout"):
        words = content_words(row["text"])
        overlap = max(len(words & other) / len(words | other) for other in train if words | other)
        assert overlap < 0.5, f"{row['text']!r} shares {overlap:.0%} of its words with a train prompt"
