"""Tokenized data on disk: one flat little-endian token file per split, plus a JSON index.

Each document is encoded as [eot] + tokens and appended to `{split}.bin` (uint16 when the vocabulary fits,
else uint32), read back as a read-only memmap. `index.json` records the token counts, the file hashes, and the
tokenizer and corpus hashes the files were made from, so a stale cache is rebuilt or refused, never silently used.
The folder is built under a temporary name and renamed into place.

Documents are encoded in chunks with HF `encode_batch`, which spreads each chunk across all cores, and the tokens
are streamed to the file chunk by chunk.
"""

import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np

from lmforge.atomic import replace_dir
from lmforge.data.corpus import ensure_replaceable, iter_corpus_texts, load_corpus
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import ConfigError, DataError

Progress = Callable[[int, int | None], None]

log = logging.getLogger(__name__)

SHARDS_FORMAT_VERSION = 1
SPLITS = ("train", "val")
INDEX_FILE = "index.json"
# One encode_batch call takes up to 512 documents or 2 MiB of text, whichever comes first: enough documents to keep
# every core busy, few enough that the per-token objects HF builds for them stay small (512 stdlib files peak at
# ~0.5 GB).
ENCODE_CHUNK_DOCS = 512
ENCODE_CHUNK_BYTES = 2 * 2**20
TOKEN_DTYPES = ("auto", "uint16", "uint32")
_NUMPY_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}  # always little-endian on disk
FIX = "re-run `lmforge prepare`"
_INDEX_KEYS = {"format_version", "dtype", "vocab_size", "tokenizer_hash", "source_hash", "splits"}
_SPLIT_KEYS = {"file", "n_tokens", "n_docs", "n_bytes", "sha256"}


def shard_dtype(vocab_size: int, token_dtype: str = "auto") -> str:
    """"uint16" or "uint32": the token type of the shards for this vocabulary."""
    if token_dtype not in TOKEN_DTYPES:
        raise ConfigError(f"unknown --data.token_dtype '{token_dtype}'; pass one of {', '.join(TOKEN_DTYPES)}")
    if token_dtype == "uint16" and vocab_size > 2**16:
        raise ConfigError(f"--data.token_dtype uint16 cannot hold a vocabulary of {vocab_size} tokens (max 65536); "
                          "pass --data.token_dtype auto or uint32")
    if token_dtype == "auto":
        return "uint16" if vocab_size <= 2**16 else "uint32"
    return token_dtype


def prepare_shards(
    corpus_dir: Path,
    tokenizer: Tokenizer,
    out_dir: Path,
    *,
    token_dtype: str = "auto",
    progress: Progress | None = None,
) -> dict:
    """Tokenize a built corpus into `out_dir`; returns the index.

    The returned index also says what happened, under keys that are not stored: "cache" is "reused" (same corpus,
    tokenizer and dtype, files of the right size: nothing is rewritten), "built" (no index before) or "rebuilt"
    (a stale or broken cache), with "cache_reason" saying why. `out_dir` is replaced as a whole, so it must be a
    folder of its own. `progress` advances by document text bytes.
    """
    out_dir = Path(out_dir)
    ensure_replaceable(out_dir, INDEX_FILE)
    corpus = load_corpus(corpus_dir)
    dtype = shard_dtype(tokenizer.vocab_size, token_dtype)
    reason = _stale_reason(out_dir, tokenizer.hash, corpus.source_hash, dtype)
    if reason is None:
        index = json.loads((out_dir / INDEX_FILE).read_text(encoding="utf-8"))
        return {**index, "cache": "reused", "cache_reason": "same corpus, tokenizer and dtype"}
    cache = "built" if reason == "no cache yet" else "rebuilt"
    log.info("tokenizing %s into %s (%s)", corpus_dir, out_dir, reason)

    total_bytes = corpus.train_bytes + corpus.val_bytes
    index = {
        "format_version": SHARDS_FORMAT_VERSION,
        "dtype": dtype,
        "vocab_size": tokenizer.vocab_size,
        "tokenizer_hash": tokenizer.hash,
        "source_hash": corpus.source_hash,
        "splits": {},
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        for split in SPLITS:
            encoded = _encoded_chunks(iter_corpus_texts(corpus_dir, split), tokenizer, dtype)
            index["splits"][split] = _write_split(encoded, tmp / f"{split}.bin",
                                                  lambda n: progress(n, total_bytes) if progress else None)
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**index, "cache": cache, "cache_reason": reason}


def _encoded_chunks(texts: Iterator[str], tokenizer: Tokenizer, dtype: str) -> Iterator[tuple[np.ndarray, int, int]]:
    """(tokens, documents, text bytes) of each chunk of `texts`, in order; tokens are (N,) [eot] + tokens of each
    document, concatenated, in the shard dtype."""
    for chunk, n_bytes in _chunks(texts):
        # encode_batch runs on every core through Rayon (2 cores: 8.4 s CPU in 4.4 s wall for 1,500 stdlib files),
        # which is how `lmforge prepare` uses the whole machine; a process pool on top of it gained nothing.
        encoded = tokenizer.encode_batch(chunk)
        count = sum(map(len, encoded)) + len(encoded)
        tokens = np.fromiter(chain.from_iterable(chain((tokenizer.eot_id,), ids) for ids in encoded),
                             dtype=_NUMPY_DTYPES[dtype], count=count)
        yield tokens, len(chunk), n_bytes


def _chunks(texts: Iterator[str]) -> Iterator[tuple[list[str], int]]:
    """Group texts into encode_batch chunks; yields (texts, their UTF-8 bytes)."""
    chunk, n_bytes = [], 0
    for text in texts:
        chunk.append(text)
        n_bytes += len(text.encode("utf-8"))
        if len(chunk) == ENCODE_CHUNK_DOCS or n_bytes >= ENCODE_CHUNK_BYTES:
            yield chunk, n_bytes
            chunk, n_bytes = [], 0
    if chunk:
        yield chunk, n_bytes


def _write_split(encoded: Iterator[tuple[np.ndarray, int, int]], path: Path, advance: Callable[[int], None]) -> dict:
    """Stream the encoded chunks of a split ((tokens, documents, text bytes), in order) into `path`; returns the
    split's index entry."""
    sha = hashlib.sha256()
    n_tokens = n_docs = n_bytes = 0
    with open(path, "wb") as f:
        for tokens, chunk_docs, chunk_bytes in encoded:
            buf = tokens.tobytes()
            f.write(buf)
            sha.update(buf)
            n_tokens, n_docs, n_bytes = n_tokens + len(tokens), n_docs + chunk_docs, n_bytes + chunk_bytes
            advance(chunk_bytes)
    return {"file": path.name, "n_tokens": n_tokens, "n_docs": n_docs, "n_bytes": n_bytes,
            "sha256": sha.hexdigest()}


def _read_index(out_dir: Path) -> dict:
    path = out_dir / INDEX_FILE
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"no tokenized data at {out_dir} ({INDEX_FILE} missing); run `lmforge prepare`") from None
    except (OSError, ValueError) as e:
        raise DataError(f"shard index {path} is unreadable ({e}); {FIX}") from None
    if not isinstance(index, dict) or index.get("format_version") != SHARDS_FORMAT_VERSION:
        raise DataError(f"shard index {path} is not format version {SHARDS_FORMAT_VERSION}; {FIX}")
    splits = index.get("splits")
    if not (_INDEX_KEYS <= index.keys() and index["dtype"] in _NUMPY_DTYPES and isinstance(splits, dict)
            and all(isinstance(splits.get(s), dict) and _SPLIT_KEYS <= splits[s].keys() for s in SPLITS)):
        raise DataError(f"shard index {path} is corrupt (missing fields); {FIX}")
    return index


def _check_file(out_dir: Path, index: dict, split: str, verify: str) -> None:
    """DataError if a split's file has the wrong size (or, with verify="hash", the wrong sha256)."""
    entry = index["splits"][split]
    path = out_dir / entry["file"]
    if not path.is_file():
        raise DataError(f"shard {path} is missing; {FIX}")
    expected = entry["n_tokens"] * _NUMPY_DTYPES[index["dtype"]].itemsize
    actual = path.stat().st_size
    if actual != expected:
        raise DataError(f"shard {path} is {actual} bytes, expected {expected} (truncated or overwritten); {FIX}")
    if verify == "hash":
        sha = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                sha.update(block)
        if sha.hexdigest() != entry["sha256"]:
            raise DataError(f"shard {path} has sha256 {sha.hexdigest()[:16]}…, expected {entry['sha256'][:16]}… "
                            f"(corrupted); {FIX}")


def _stale_reason(out_dir: Path, tokenizer_hash: str, source_hash: str, dtype: str) -> str | None:
    """Why the cache in `out_dir` cannot be reused, or None if it can."""
    if not (out_dir / INDEX_FILE).exists():
        return "no cache yet"
    try:
        index = _read_index(out_dir)
        for split in SPLITS:
            _check_file(out_dir, index, split, "size")
    except DataError as e:
        return f"broken cache: {e}"
    if index["tokenizer_hash"] != tokenizer_hash:
        return f"tokenizer changed ({index['tokenizer_hash'][:12]} -> {tokenizer_hash[:12]})"
    if index["source_hash"] != source_hash:
        return f"corpus changed ({index['source_hash'][:12]} -> {source_hash[:12]})"
    if index["dtype"] != dtype:
        return f"token dtype changed ({index['dtype']} -> {dtype})"
    return None


@dataclass(frozen=True)
class ShardSet:
    """A verified tokenized-data folder."""

    dir: Path
    index: dict

    @property
    def vocab_size(self) -> int:
        return self.index["vocab_size"]

    def tokens(self, split: str) -> np.ndarray:
        """(N,) the split's token stream as a read-only memmap (an empty array for an empty split)."""
        if split not in self.index["splits"]:
            raise DataError(f"no split '{split}' in {self.dir}; splits are {', '.join(self.index['splits'])}")
        entry = self.index["splits"][split]
        dtype = _NUMPY_DTYPES[self.index["dtype"]]
        if entry["n_tokens"] == 0:
            return np.empty(0, dtype=dtype)  # mmap cannot map an empty file
        return np.memmap(self.dir / entry["file"], dtype=dtype, mode="r", shape=(entry["n_tokens"],))


def load_shards(
    out_dir: Path,
    *,
    expected_tokenizer_hash: str | None = None,
    expected_source_hash: str | None = None,
    verify: str = "size",
) -> ShardSet:
    """Open prepared shards, checking them against the expected tokenizer / corpus and `verify` ("none",
    "size": file sizes match the token counts, "hash": sizes and sha256)."""
    if verify not in ("none", "size", "hash"):
        raise ValueError(f"verify must be 'none', 'size' or 'hash', got {verify!r}")
    out_dir = Path(out_dir)
    index = _read_index(out_dir)
    if expected_tokenizer_hash is not None and index["tokenizer_hash"] != expected_tokenizer_hash:
        raise DataError(f"shards in {out_dir} were made with tokenizer {index['tokenizer_hash'][:12]}, but this run "
                        f"uses tokenizer {expected_tokenizer_hash[:12]} (stale cache); {FIX}")
    if expected_source_hash is not None and index["source_hash"] != expected_source_hash:
        raise DataError(f"shards in {out_dir} were made from corpus {index['source_hash'][:12]}, but this run uses "
                        f"corpus {expected_source_hash[:12]} (stale cache); {FIX}")
    if verify != "none":
        for split in SPLITS:
            _check_file(out_dir, index, split, verify)
    return ShardSet(out_dir, index)
