"""Tests for lmforge.data: sources, corpus split, tokenizer round trips, shard caches and the batch loader."""

import json
import os
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lmforge.data.corpus import (
    SourceStats,
    build_corpus,
    iter_corpus_texts,
    iter_documents,
    load_corpus,
    split_of,
)
from lmforge.data import shards
from lmforge.data.loader import BatchLoader, iter_eval_batches
from lmforge.data.shards import load_shards, prepare_shards, shard_dtype
from lmforge.data.tokenizer import SPECIAL_TOKENS, Tokenizer, train_tokenizer
from lmforge.errors import ConfigError, DataError

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # hypothesis is optional; the seeded fuzz test below covers the same ground
    given = None

TRICKY = [
    "",
    " ",
    "hello world",
    "line one\r\nline two\r\n",
    "tabs\tand\x00nul\x01\x1f\x7f controls",
    "naïve café, 中文, русский, العربية",
    "emoji 😀👍🏽 and a flag 🇫🇷 and a family 👨‍👩‍👧",
    "literal <|endoftext|> and <|user|> in text",
    "<|endoftext|>",
    "\ufffd replacement char",
    "trailing spaces   \n\n\n",
    "  leading spaces",
    "def f(x):\n    return x ** 2  # square\n",
]


def _make_text_corpus(root: Path, n_docs: int = 60, seed: int = 0) -> Path:
    """A small, varied corpus of text files: code, prose, unicode and a few literal special-token strings."""
    rng = random.Random(seed)
    words = ["def", "return", "class", "import", "self", "the", "data", "model", "token", "naïve", "中文", "😀",
             "<|endoftext|>", "\r\n", "\t", "x = 1", "print(x)", "for i in range(10):", "if", "else"]
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        n = rng.randint(20, 400)
        text = " ".join(rng.choice(words) for _ in range(n)) + "\n"
        (root / f"doc{i:03d}.txt").write_text(text, encoding="utf-8", newline="")
    return root


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("corpus")
    src = _make_text_corpus(tmp / "src")
    build_corpus(str(src), tmp / "corpus", val_fraction=0.1)
    return tmp / "corpus"


@pytest.fixture(scope="module")
def tokenizer(corpus_dir, tmp_path_factory) -> Tokenizer:
    return train_tokenizer(iter_corpus_texts(corpus_dir, "train"), 400, tmp_path_factory.mktemp("tok"))


# ----------------------------------------------------------------------------------------------------------------
# tokenizer


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_tricky_strings(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.eot_id not in ids or text == ""  # literal special strings are plain bytes


def test_round_trip_seeded_fuzz(tokenizer):
    rng = random.Random(1)
    alphabet = [chr(c) for c in range(0, 0x250)] + ["😀", "🇫", "\u200d", "\U0010fffd", "中", "\r\n", "<|end|>"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(200)]
    for text, ids in zip(texts, tokenizer.encode_batch(texts)):
        assert ids == tokenizer.encode(text)
        assert tokenizer.decode(ids) == text


if given is not None:

    @settings(max_examples=50, deadline=None)
    @given(text=st.text())
    def test_round_trip_hypothesis(tokenizer, text):
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_special_tokens_and_metadata(tokenizer):
    assert tokenizer.special_ids == {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    assert tokenizer.eot_id == 0
    assert tokenizer.encode("<|endoftext|>") != [0]
    assert tokenizer.decode([0, 3]) == "<|endoftext|><|user|>"  # specials are not skipped
    meta = json.loads((tokenizer.path.parent / "meta.json").read_text())
    assert meta["vocab_size"] == tokenizer.vocab_size and meta["requested_vocab_size"] == 400
    assert meta["sha256"] == tokenizer.hash
    again = Tokenizer.load(tokenizer.path.parent)
    assert again.hash == tokenizer.hash and again.vocab_size == tokenizer.vocab_size
    assert again.encode(TRICKY[6]) == tokenizer.encode(TRICKY[6])


def test_small_corpus_gives_smaller_actual_vocab(tmp_path):
    tok = train_tokenizer(["tiny corpus", "tiny"], 5000, tmp_path)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert tok.vocab_size == meta["vocab_size"] < meta["requested_vocab_size"] == 5000
    assert tok.decode(tok.encode("anything 😀")) == "anything 😀"  # all 256 bytes are there anyway


@pytest.mark.parametrize("vocab_size", [100, 262, 2**32 + 1])
def test_vocab_size_out_of_range(tmp_path, vocab_size):
    with pytest.raises(ConfigError, match="--tokenizer.vocab_size"):
        train_tokenizer(["x"], vocab_size, tmp_path)


def test_tokenizer_load_errors(tmp_path, tokenizer):
    with pytest.raises(DataError, match="lmforge tokenizer train"):
        Tokenizer.load(tmp_path / "nothing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="corrupt"):
        Tokenizer.load(tmp_path / "bad")
    (tmp_path / "edited").mkdir()
    (tmp_path / "edited" / "tokenizer.json").write_bytes(tokenizer.path.read_bytes() + b" ")
    (tmp_path / "edited" / "meta.json").write_bytes((tokenizer.path.parent / "meta.json").read_bytes())
    with pytest.raises(DataError, match="does not match the sha256"):
        Tokenizer.load(tmp_path / "edited")


def test_token_byte_lengths(tokenizer):
    lengths = tokenizer.token_byte_lengths()
    assert lengths.dtype == np.int32 and lengths.shape == (tokenizer.vocab_size,)
    assert (lengths[: len(SPECIAL_TOKENS)] == 0).all() and (lengths[len(SPECIAL_TOKENS):] >= 1).all()
    for text in TRICKY:
        assert lengths[tokenizer.encode(text)].sum() == len(text.encode("utf-8"))


def test_decode_stream_matches_decode(tokenizer):
    text = "naïve 😀👍🏽 中文 <|endoftext|> text"
    ids = tokenizer.encode(text)
    stream = tokenizer.decode_stream()
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) + stream.flush() == text
    assert all("\ufffd" not in p for p in pieces)  # partial characters are held back, not mangled
    rng = np.random.default_rng(0)
    ids = rng.integers(0, tokenizer.vocab_size, size=300).tolist()  # arbitrary ids, invalid UTF-8 included
    stream = tokenizer.decode_stream()
    assert "".join(stream.push(i) for i in ids) + stream.flush() == tokenizer.decode(ids)


# ----------------------------------------------------------------------------------------------------------------
# sources and the corpus


def test_text_source_counts_binary_invalid_and_empty(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_bytes(b"good text\n")
    (src / "sub" / "b.txt").write_bytes(b"bad \xff\xfe bytes and a real \xef\xbf\xbd\n")
    (src / "image.bin").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00data")
    (src / "empty.txt").write_bytes(b"")
    (src / "blank.txt").write_bytes(b"  \n\t\n")
    (src / ".hidden").write_bytes(b"hidden files are skipped")
    stats = SourceStats()
    docs = list(iter_documents(str(src), stats=stats))
    assert [d.id for d in docs] == ["a.txt", "sub/b.txt"]
    assert docs[1].text == "bad \ufffd\ufffd bytes and a real \ufffd\n"
    assert (stats.n_docs, stats.n_files, stats.n_binary_skipped, stats.n_empty_skipped) == (2, 5, 1, 2)
    assert stats.n_replaced_chars == 2  # the genuine U+FFFD is not counted
    assert stats.n_bytes == sum(len(d.text.encode()) for d in docs)
    glob_only = list(iter_documents(str(src), glob="sub/*.txt"))
    assert [d.id for d in glob_only] == ["sub/b.txt"]
    assert [d.id for d in iter_documents(str(src / "a.txt"))] == ["a.txt"]


def test_jsonl_source(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [{"text": "first doc"}, {"text": ""}, {"text": "second \ud800 doc", "meta": 1}, {"text": None}]
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")
    stats = SourceStats()
    docs = list(iter_documents(str(path), stats=stats))
    assert [(d.id, d.text) for d in docs] == [("data.jsonl:1", "first doc"), ("data.jsonl:3", "second \ufffd doc")]
    assert (stats.n_docs, stats.n_empty_skipped, stats.n_replaced_chars, stats.n_files) == (2, 2, 1, 1)
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"body": "x", "title": "y"}) + "\n")
    assert [d.text for d in iter_documents(str(other), text_field="body")] == ["x"]
    with pytest.raises(DataError, match=r"no field 'text' \(found: body, title\).*--data.text_field"):
        list(iter_documents(str(other)))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"broken.jsonl:2"):
        list(iter_documents(str(broken)))


def test_jsonl_directory_is_detected(tmp_path):
    src = tmp_path / "shards"
    src.mkdir()
    for i in range(2):
        (src / f"part{i}.jsonl").write_text(json.dumps({"text": f"doc {i}"}) + "\n")
    stats = build_corpus(str(src), tmp_path / "corpus", val_fraction=0.0)
    assert stats.format == "jsonl" and stats.n_docs == 2
    assert list(iter_corpus_texts(tmp_path / "corpus", "train")) == ["doc 0", "doc 1"]


def test_parquet_source(tmp_path):
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"content": ["alpha", "beta", None, "  ", "gamma"], "n": [1, 2, 3, 4, 5]}), path,
                   row_group_size=2)
    stats = SourceStats()
    docs = list(iter_documents(str(path), text_field="content", stats=stats))
    assert [(d.id, d.text) for d in docs] == [("data.parquet:0", "alpha"), ("data.parquet:1", "beta"),
                                              ("data.parquet:4", "gamma")]
    assert (stats.n_docs, stats.n_empty_skipped) == (3, 2)
    with pytest.raises(DataError, match=r"no field 'text' \(found: content, n\).*--data.text_field"):
        list(iter_documents(str(path)))
    with pytest.raises(DataError, match="not a string"):
        list(iter_documents(str(path), text_field="n"))
    progress = []
    build_corpus(str(path), tmp_path / "corpus", text_field="content", progress=lambda n, t: progress.append((n, t)))
    assert sum(n for n, _ in progress) == path.stat().st_size == progress[-1][1]


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(DataError, match=r"corpus source '.*nope' does not exist; pass --data.source"):
        build_corpus(str(tmp_path / "nope"), tmp_path / "corpus")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"has no text documents \(0 binary files and 0 empty files skipped\)"):
        build_corpus(str(empty), tmp_path / "corpus")
    for i in range(3):
        (empty / f"b{i}.bin").write_bytes(b"\x00\x01")
    (empty / "e.txt").write_text("")
    with pytest.raises(DataError, match=r"\(3 binary files and 1 empty file skipped\)"):
        build_corpus(str(empty), tmp_path / "corpus")
    assert not (tmp_path / "corpus").exists()
    assert os.listdir(tmp_path) == ["empty"]  # no temporary folder left behind
    with pytest.raises(ConfigError, match="--data.format"):
        build_corpus(str(empty), tmp_path / "corpus", format="csv")
    with pytest.raises(ConfigError, match="--data.val_fraction"):
        build_corpus(str(empty), tmp_path / "corpus", val_fraction=1.0)


def test_stdlib_source():
    stats = SourceStats()
    ids = [d.id for d in iter_documents("stdlib", stats=stats)]
    assert len(ids) > 1000 and ids == sorted(ids)
    assert not any("site-packages" in i or "dist-packages" in i for i in ids)
    assert all(i.endswith(".py") for i in ids)
    assert stats.n_bytes > 10_000_000


def test_split_is_deterministic_and_content_based(tmp_path):
    texts = [f"document number {i}\n" for i in range(2000)]
    splits = [split_of(t, 0.1) for t in texts]
    assert splits == [split_of(t, 0.1) for t in texts]
    assert 100 < splits.count("val") < 300
    assert all(split_of(t, 0.0) == "train" for t in texts[:100])
    # the same documents under other names and in another order land in the same splits
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    for i, text in enumerate(texts[:200]):
        (a / f"{i:04d}.txt").write_text(text)
        (b / f"{199 - i:04d}-copy.txt").write_text(text)
    (b / "dup.txt").write_text(texts[0])
    sa = build_corpus(str(a), tmp_path / "ca", val_fraction=0.1)
    sb = build_corpus(str(b), tmp_path / "cb", val_fraction=0.1)
    for split in ("train", "val"):
        ta, tb = set(iter_corpus_texts(tmp_path / "ca", split)), set(iter_corpus_texts(tmp_path / "cb", split))
        assert ta == tb and ta == {t for t in texts[:200] if split_of(t, 0.1) == split}
    assert sa.source_hash != sb.source_hash  # ids differ
    assert sa.train_docs + sa.val_docs == 200 and sb.train_docs + sb.val_docs == 201


def test_small_corpus_always_gets_a_val_split(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    texts = ["alpha\n", "beta\n", "gamma\n", "beta\n"]
    for i, text in enumerate(texts):
        (src / f"{i}.txt").write_text(text)
    assert all(split_of(t, 0.01) == "train" for t in texts)
    stats = build_corpus(str(src), tmp_path / "corpus", val_fraction=0.01)
    val = list(iter_corpus_texts(tmp_path / "corpus", "val"))
    train = list(iter_corpus_texts(tmp_path / "corpus", "train"))
    assert stats.val_docs == len(val) >= 1 and stats.train_docs == len(train) and len(val) + len(train) == 4
    assert not set(val) & set(train)  # duplicates move together
    assert stats.val_bytes == sum(len(t.encode()) for t in val)
    assert load_corpus(tmp_path / "corpus") == stats
    assert build_corpus(str(src), tmp_path / "corpus", val_fraction=0.0).val_docs == 0
    assert build_corpus(str(src), tmp_path / "corpus", val_fraction=0.0).source_hash != stats.source_hash


def test_corpus_replace_is_atomic_and_load_errors(tmp_path, corpus_dir):
    with pytest.raises(DataError, match="lmforge corpus build"):
        load_corpus(tmp_path / "missing")
    src = _make_text_corpus(tmp_path / "src", n_docs=5)
    first = build_corpus(str(src), tmp_path / "corpus")
    (src / "bad.jsonl").write_text("not json\n")
    with pytest.raises(DataError, match="bad.jsonl:1"):
        build_corpus(str(src / "bad.jsonl"), tmp_path / "corpus")
    assert load_corpus(tmp_path / "corpus") == first  # the failed build left the old corpus alone
    (src / "doc000.txt").write_text("changed\n")
    second = build_corpus(str(src), tmp_path / "corpus")
    assert second.source_hash != first.source_hash and load_corpus(tmp_path / "corpus") == second
    assert sorted(os.listdir(tmp_path)) == ["corpus", "src"]
    (tmp_path / "corpus" / "stats.json").write_text("{}")
    with pytest.raises(DataError, match="lmforge corpus build"):
        load_corpus(tmp_path / "corpus")
    with pytest.raises(DataError, match="refusing to replace .*src"):  # a mistyped out_dir deletes nothing
        build_corpus(str(src), src)
    assert (src / "doc000.txt").exists()


# ----------------------------------------------------------------------------------------------------------------
# shards


def test_shard_dtype_choice():
    assert shard_dtype(400) == "uint16" and shard_dtype(65536) == "uint16"
    assert shard_dtype(65537) == "uint32" and shard_dtype(400, "uint32") == "uint32"
    with pytest.raises(ConfigError, match="--data.token_dtype"):
        shard_dtype(70000, "uint16")
    with pytest.raises(ConfigError, match="--data.token_dtype"):
        shard_dtype(400, "int8")


def test_prepare_writes_documents_with_eot(tmp_path, corpus_dir, tokenizer):
    progress = []
    index = prepare_shards(corpus_dir, tokenizer, tmp_path / "shards", progress=lambda n, t: progress.append((n, t)))
    assert index["cache"] == "built" and index["dtype"] == "uint16"
    corpus = load_corpus(corpus_dir)
    assert sum(n for n, _ in progress) == progress[-1][1] == corpus.train_bytes + corpus.val_bytes
    shards = load_shards(tmp_path / "shards", expected_tokenizer_hash=tokenizer.hash,
                         expected_source_hash=corpus.source_hash, verify="hash")
    for split in ("train", "val"):
        tokens = shards.tokens(split)
        texts = list(iter_corpus_texts(corpus_dir, split))
        assert isinstance(tokens, np.memmap) and not tokens.flags.writeable and tokens.dtype == np.dtype("<u2")
        assert tokens[0] == tokenizer.eot_id and (tokens == tokenizer.eot_id).sum() == len(texts)
        assert shards.index["splits"][split]["n_bytes"] == sum(len(t.encode()) for t in texts)
        assert tokenizer.decode(tokens.tolist()) == "".join("<|endoftext|>" + t for t in texts)
    wide = prepare_shards(corpus_dir, tokenizer, tmp_path / "wide", token_dtype="uint32")
    assert wide["dtype"] == "uint32"
    wide_tokens = load_shards(tmp_path / "wide").tokens("train")
    assert wide_tokens.dtype == np.dtype("<u4") and (wide_tokens == shards.tokens("train")).all()
    assert (tmp_path / "wide" / "train.bin").stat().st_size == 2 * (tmp_path / "shards" / "train.bin").stat().st_size


def test_prepare_in_small_chunks_writes_the_same_files(tmp_path, corpus_dir, tokenizer, monkeypatch):
    whole = prepare_shards(corpus_dir, tokenizer, tmp_path / "whole")
    monkeypatch.setattr(shards, "ENCODE_CHUNK_DOCS", 3)  # many small chunks, cut by documents and by bytes
    monkeypatch.setattr(shards, "ENCODE_CHUNK_BYTES", 4096)
    progress = []
    chunked = prepare_shards(corpus_dir, tokenizer, tmp_path / "chunked", progress=lambda n, t: progress.append(n))
    assert chunked == whole and len(progress) > 4
    assert sum(progress) == chunked["splits"]["train"]["n_bytes"] + chunked["splits"]["val"]["n_bytes"]
    for name in ("train.bin", "val.bin", "index.json"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "chunked" / name).read_bytes()


def test_prepare_is_a_noop_on_rerun_and_rebuilds_when_stale(tmp_path, corpus_dir, tokenizer):
    out = tmp_path / "shards"
    prepare_shards(corpus_dir, tokenizer, out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = prepare_shards(corpus_dir, tokenizer, out)
    assert again["cache"] == "reused"
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    # a changed corpus (same path) makes the cache stale: prepare rebuilds, training refuses the old one
    src = _make_text_corpus(tmp_path / "src", n_docs=8, seed=5)
    build_corpus(str(src), tmp_path / "corpus2", val_fraction=0.2)
    old_source_hash = again["source_hash"]
    new_corpus = load_corpus(tmp_path / "corpus2")
    with pytest.raises(DataError, match="stale cache.*lmforge prepare"):
        load_shards(out, expected_source_hash=new_corpus.source_hash)
    rebuilt = prepare_shards(tmp_path / "corpus2", tokenizer, out)
    assert rebuilt["cache"] == "rebuilt" and "corpus changed" in rebuilt["cache_reason"]
    assert rebuilt["source_hash"] == new_corpus.source_hash != old_source_hash
    with pytest.raises(DataError, match="tokenizer .*stale cache"):
        load_shards(out, expected_tokenizer_hash="0" * 64)
    other_tok = train_tokenizer(iter_corpus_texts(corpus_dir, "train"), 300, tmp_path / "tok300")
    changed = prepare_shards(tmp_path / "corpus2", other_tok, out)
    assert changed["cache"] == "rebuilt" and "tokenizer changed" in changed["cache_reason"]
    assert sorted(os.listdir(tmp_path)) == ["corpus2", "shards", "src", "tok300"]


def test_truncated_and_corrupted_shards(tmp_path, corpus_dir, tokenizer):
    out = tmp_path / "shards"
    prepare_shards(corpus_dir, tokenizer, out)
    path = out / "train.bin"
    data = path.read_bytes()
    path.write_bytes(data[:-2])
    with pytest.raises(DataError, match=rf"train.bin is {len(data) - 2} bytes, expected {len(data)}.*lmforge prepare"):
        load_shards(out)
    assert prepare_shards(corpus_dir, tokenizer, out)["cache"] == "rebuilt"  # a broken cache is rebuilt
    flipped = bytearray(path.read_bytes())
    flipped[10] ^= 0xFF
    path.write_bytes(bytes(flipped))
    load_shards(out)  # the size check cannot see a flipped byte...
    with pytest.raises(DataError, match=r"train.bin has sha256 .* expected .*lmforge prepare"):
        load_shards(out, verify="hash")  # ...the hash check can
    (out / "index.json").unlink()
    with pytest.raises(DataError, match="lmforge prepare"):
        load_shards(out)
    with pytest.raises(DataError, match="refusing to replace"):
        prepare_shards(corpus_dir, tokenizer, out)


# ----------------------------------------------------------------------------------------------------------------
# loader


def _tokens(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.uint16)  # token value = position, so windows are easy to identify


def _starts(x: torch.Tensor) -> list[int]:
    return x[:, 0].tolist()


def test_loader_shapes_and_shift():
    loader = BatchLoader(_tokens(1000), batch_size=4, seq_len=16, seed=3)
    x, y = next(loader)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y[:, -1], x[:, -1] + 1)
    assert all(s % 16 == 0 for s in _starts(x))


def test_loader_uses_every_token_in_an_epoch():
    T, B, n_windows = 8, 4, 24  # 24 windows = 6 batches exactly
    tokens = _tokens(n_windows * T + 1 + 5)  # the 5 tail tokens cannot fill a window
    loader = BatchLoader(tokens, B, T, seed=1)
    assert loader.batches_per_epoch == 6 and loader.tokens_per_epoch == n_windows * T
    seen = np.zeros(len(tokens), dtype=int)
    for _ in range(loader.batches_per_epoch):
        x, y = next(loader)
        seen[x.flatten().numpy()] += 1
    assert (seen[: n_windows * T] == 1).all()
    assert loader.epoch == 0
    next(loader)
    assert loader.epoch == 1


def test_loader_drops_partial_batch_but_permutes_per_epoch():
    loader = BatchLoader(_tokens(10 * 8 + 1), 3, 8, seed=0)  # 10 windows, 3 batches of 3: one dropped per epoch
    epochs = [[s for _ in range(3) for s in _starts(next(loader)[0])] for _ in range(4)]
    assert all(len(set(e)) == 9 for e in epochs)
    assert len({tuple(e) for e in epochs}) == 4
    assert set().union(*map(set, epochs)) == {i * 8 for i in range(10)}


def test_loader_resume_is_bitwise_identical():
    tokens = _tokens(5000)
    original = BatchLoader(tokens, 4, 16, seed=7)
    for _ in range(100):  # crosses an epoch boundary (78 windows -> 19 batches per epoch)
        next(original)
    state = json.loads(json.dumps(original.state_dict()))  # survives serialisation
    resumed = BatchLoader(tokens, 4, 16, seed=7)
    resumed.load_state_dict(state)
    for _ in range(50):
        (xa, ya), (xb, yb) = next(original), next(resumed)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    with pytest.raises(DataError, match="seq_len"):
        BatchLoader(tokens, 4, 8, seed=7).load_state_dict(state)
    two_ranks = BatchLoader(tokens, 2, 16, seed=7, rank=0, world_size=2)
    two_ranks.load_state_dict(state)  # same global batch on more ranks: allowed


def test_loader_ranks_are_disjoint_and_cover_the_single_rank_batches():
    tokens, B, T, steps = _tokens(4000), 3, 10, 20
    ranks = [BatchLoader(tokens, B, T, rank=r, world_size=2, seed=11) for r in range(2)]
    single = BatchLoader(tokens, 2 * B, T, seed=11)
    for _ in range(steps):
        (x0, _), (x1, _), (xs, _) = next(ranks[0]), next(ranks[1]), next(single)
        assert not set(_starts(x0)) & set(_starts(x1))
        assert torch.equal(torch.cat([x0, x1]), xs)


def test_loader_too_few_tokens():
    with pytest.raises(DataError, match=r"has 100 tokens; one batch needs 4\*2\*16\+1 = 129.*--train.batch_size"):
        BatchLoader(_tokens(100), 4, 16, world_size=2)
    BatchLoader(_tokens(129), 4, 16, world_size=2)


def test_eval_batches_are_sequential():
    tokens = _tokens(10 * 8 + 3)
    batches = list(iter_eval_batches(tokens, 4, 8, max_batches=None))
    assert [x.shape[0] for x, _ in batches] == [4, 4, 2]
    assert [s for x, _ in batches for s in _starts(x)] == [i * 8 for i in range(10)]
    assert len(list(iter_eval_batches(tokens, 4, 8, max_batches=2))) == 2
    first, again = next(iter_eval_batches(tokens, 4, 8, 1)), next(iter_eval_batches(tokens, 4, 8, 1))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], first[0] + 1)
    assert list(iter_eval_batches(_tokens(5), 4, 8, None)) == []
