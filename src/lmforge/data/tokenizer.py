"""Byte-level BPE tokenizer, trained and run by Hugging Face `tokenizers` (Rust; batch encoding uses every core).

As in GPT-2, text is first mapped to bytes and every byte is a token, so any string round-trips exactly:
decode(encode(s)) == s. Special tokens take ids 0..5; literal special-token strings inside data are encoded as
plain bytes (never as the special id), so a document cannot forge a document boundary or a chat role.
On disk a tokenizer is a folder with `tokenizer.json` (the HF format) and `meta.json` (sizes, hash, specials).
"""

import codecs
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmforge.atomic import write_file_atomic
from lmforge.errors import ConfigError, DataError


# The document boundary comes first (id 0); the chat roles are reserved now so that chat fine-tuning later does
# not change the ids of a pretrained model.
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS) + 1  # every byte, the specials, and room for at least one merge
MAX_VOCAB_SIZE = 2**32  # ids must fit the uint32 shards
TOKENIZER_FILE = "tokenizer.json"
META_FILE = "meta.json"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character: the alphabet byte-level BPE tokens are spelled in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


_CHAR_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: Path,
    *,
    min_frequency: int = 2,
) -> "Tokenizer":
    """Train a byte-level BPE on `texts` and write `out_dir/tokenizer.json` + `out_dir/meta.json`.

    A corpus too small to yield `vocab_size` tokens gives a smaller vocabulary; `meta.json` records both, and
    `Tokenizer.vocab_size` is the actual one (the size a model must use). To show progress, wrap `texts` in an
    iterator that reports what it yields (the CLI does).
    """
    if not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
        raise ConfigError(f"--tokenizer.vocab_size {vocab_size} is out of range; it must be at least "
                          f"{MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special tokens + 1 merge) and at "
                          f"most {MAX_VOCAB_SIZE}")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even those the corpus lacks
        show_progress=False,
    )

    hf.train_from_iterator(texts, trainer=trainer)
    for i, token in enumerate(SPECIAL_TOKENS):
        if hf.token_to_id(token) != i:
            raise RuntimeError(f"special token {token} got id {hf.token_to_id(token)}, expected {i}")
    raw = hf.to_str().encode("utf-8")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_file_atomic(out_dir / TOKENIZER_FILE, raw)
    meta = {
        "vocab_size": hf.get_vocab_size(with_added_tokens=True),
        "requested_vocab_size": vocab_size,
        "sha256": hashlib.sha256(raw).hexdigest(),
        "special_tokens": {token: i for i, token in enumerate(SPECIAL_TOKENS)},
    }
    write_file_atomic(out_dir / META_FILE, (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
    return Tokenizer(hf, out_dir / TOKENIZER_FILE, raw)


class DecodeStream:
    """Incremental decoding for generation: `push` returns only complete UTF-8 text.

    A byte-level token can end in the middle of a multi-byte character; those bytes are held back until the
    character is complete. Invalid sequences become U+FFFD, exactly as in `Tokenizer.decode`.
    """

    def __init__(self, token_bytes: list[bytes]):
        self._token_bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._token_bytes[token_id])

    def flush(self) -> str:
        """The held-back tail at the end of generation (U+FFFD for an incomplete character)."""
        return self._utf8.decode(b"", final=True)


class Tokenizer:
    """A trained byte-level BPE tokenizer. Build one with `train_tokenizer` or `Tokenizer.load`."""

    def __init__(self, hf: HFTokenizer, path: Path, raw: bytes):
        self._hf = hf
        self._hf.encode_special_tokens = True  # literal "<|endoftext|>" in data is text, not a boundary
        self.path = Path(path)
        self.hash = hashlib.sha256(raw).hexdigest()  # identifies the tokenizer for shard caches and checkpoints
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        self.special_ids = {t: i for t in SPECIAL_TOKENS if (i := hf.token_to_id(t)) is not None}
        self.eot_id = self.special_ids["<|endoftext|>"]
        self._token_bytes: list[bytes] | None = None

    @classmethod
    def load(cls, dir_or_file: Path) -> "Tokenizer":
        """Load `tokenizer.json` (or a folder holding it); DataError if missing, corrupt or not ours."""
        path = Path(dir_or_file)
        path = path / TOKENIZER_FILE if path.is_dir() else path
        fix = "run `lmforge tokenizer train` to (re)build it"
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise DataError(f"no tokenizer at {path}; {fix}") from None
        try:
            hf = HFTokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:  # tokenizers raises a bare Exception for malformed JSON
            raise DataError(f"tokenizer {path} is corrupt ({str(e).splitlines()[0]}); {fix}") from None
        meta_path = path.parent / META_FILE
        if meta_path.is_file():
            try:
                expected = json.loads(meta_path.read_text(encoding="utf-8"))["sha256"]
            except (ValueError, KeyError, TypeError):
                raise DataError(f"tokenizer metadata {meta_path} is corrupt; {fix}") from None
            if expected != hashlib.sha256(raw).hexdigest():
                raise DataError(f"tokenizer {path} does not match the sha256 in {meta_path} (a partial write or "
                                f"an edit); {fix}")
        if hf.token_to_id(SPECIAL_TOKENS[0]) is None:
            raise DataError(f"tokenizer {path} has no {SPECIAL_TOKENS[0]} token; {fix}")
        return cls(hf, path, raw)

    def encode(self, text: str) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts in parallel on all cores (Rayon)."""
        return [e.ids for e in self._hf.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` (a list, array or tensor); special tokens appear as their text, invalid UTF-8 as U+FFFD."""
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
        return self._hf.decode(ids, skip_special_tokens=False)

    def decode_stream(self) -> DecodeStream:
        return DecodeStream(self._bytes_table())

    def token_byte_lengths(self) -> np.ndarray:
        """(V,) int32: the UTF-8 bytes each token stands for, 0 for special tokens; for bits per byte."""
        specials = set(self._hf.get_added_tokens_decoder())
        return np.array([0 if i in specials else len(b) for i, b in enumerate(self._bytes_table())], dtype=np.int32)

    def _bytes_table(self) -> list[bytes]:
        """For each id, the bytes it decodes to (a special token decodes to its own text)."""
        if self._token_bytes is None:
            added = self._hf.get_added_tokens_decoder()
            table = []
            for i in range(self.vocab_size):
                if i in added:
                    table.append(added[i].content.encode("utf-8"))
                else:
                    token = self._hf.id_to_token(i)
                    table.append(bytes(_CHAR_TO_BYTE[c] for c in token) if token is not None else b"")
            self._token_bytes = table
        return self._token_bytes
