"""Corpus sources -> documents -> a cached corpus with a deterministic train/val split.

A source is a directory of text files, a .jsonl or .parquet file (or a directory of them), or "stdlib": every
*.py file of the running Python's standard library (~1,800 files, ~31 MB), the built-in default corpus.
Directories are walked with a glob in sorted order, skipping hidden files and folders (.git, .venv, ...); a file
with a NUL byte near its start is binary and skipped; invalid UTF-8 becomes U+FFFD and is counted.
`build_corpus` streams the documents of a source into `train.jsonl` / `val.jsonl` plus `stats.json` in one folder,
written under a temporary name and renamed, so a crash never leaves half a corpus behind.

Which split a document lands in depends only on the sha256 of its text: identical documents land together, and
the split does not depend on file order, machine or Python version.
"""

import hashlib
import json
import os
import shutil
import sysconfig
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from lmforge.atomic import replace_dir
from lmforge.errors import ConfigError, DataError

Progress = Callable[[int, int | None], None]

CORPUS_FORMAT_VERSION = 1
FORMATS = ("auto", "stdlib", "text", "jsonl", "parquet")
BINARY_SNIFF_BYTES = 8192  # a NUL byte in the first 8 KiB marks a file as binary (the heuristic git and grep use)
PARQUET_BATCH_ROWS = 1024  # rows per record batch: bounds memory however large the parquet file is
_UTF8_REPLACEMENT = "\ufffd"


@dataclass
class Document:
    id: str  # stable: the relative path of a text file, or "file:line" / "file:row" for jsonl / parquet
    text: str


@dataclass
class SourceStats:
    """What reading a source found; filled in as `iter_documents` runs."""

    n_docs: int = 0
    n_bytes: int = 0  # UTF-8 bytes of the decoded text of the kept documents
    n_replaced_chars: int = 0  # invalid UTF-8 sequences (or lone surrogates) replaced by U+FFFD
    n_binary_skipped: int = 0
    n_empty_skipped: int = 0
    n_files: int = 0


@dataclass
class CorpusStats(SourceStats):
    """A built corpus: the source statistics plus the split. Stored as `stats.json`."""

    train_docs: int = 0
    val_docs: int = 0
    train_bytes: int = 0
    val_bytes: int = 0
    # sha256 over the ids and texts in source order, the val fraction and any document moved to rescue an empty
    # split: it changes whenever the documents or their split change, so caches keyed on it are never stale.
    source_hash: str = ""
    source: str = ""
    format: str = ""  # the resolved format, never "auto"
    val_fraction: float = 0.0


# ----------------------------------------------------------------------------------------------------------------
# reading sources


def stdlib_root() -> Path:
    """The running interpreter's standard library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def resolve_format(source: str, format: str = "auto", glob: str = "**/*") -> str:
    """The concrete format of a source: "stdlib", "text", "jsonl" or "parquet"."""
    if format not in FORMATS:
        raise ConfigError(f"unknown corpus format '{format}'; pass --data.format one of {', '.join(FORMATS)}")
    if format == "stdlib" or (format == "auto" and source == "stdlib"):
        return "stdlib"
    path = _existing_path(source)
    if format != "auto":
        return format
    if path.is_file():
        return {".jsonl": "jsonl", ".parquet": "parquet"}.get(path.suffix.lower(), "text")
    suffixes = {p.suffix.lower() for p in _walk(path, glob)}
    if suffixes == {".jsonl"}:
        return "jsonl"
    if suffixes == {".parquet"}:
        return "parquet"
    return "text"


def iter_documents(
    source: str,
    format: str = "auto",
    glob: str = "**/*",
    text_field: str = "text",
    stats: SourceStats | None = None,
    *,
    progress: Progress | None = None,
) -> Iterator[Document]:
    """Yield the non-empty documents of a source in a stable order, counting what was kept and skipped in `stats`.

    `progress` advances by source bytes read (the total is the sum of the file sizes).
    """
    stats = stats if stats is not None else SourceStats()
    fmt = resolve_format(source, format, glob)
    if fmt == "stdlib":
        root = stdlib_root()
        files = [p for p in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix())
                 if p.is_file() and not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)]
        yield from _iter_text_files(root, files, stats, _bytes_progress(progress, files))
        return
    path = _existing_path(source)
    if fmt == "text":
        root, files = (path.parent, [path]) if path.is_file() else (path, _walk(path, glob))
        yield from _iter_text_files(root, files, stats, _bytes_progress(progress, files))
        return
    suffix = "." + fmt
    root, files = (path.parent, [path]) if path.is_file() else \
        (path, [p for p in _walk(path, glob) if p.suffix.lower() == suffix])
    advance = _bytes_progress(progress, files)
    reader = _iter_jsonl if fmt == "jsonl" else _iter_parquet
    for file in files:
        stats.n_files += 1
        for doc in reader(file, file.relative_to(root).as_posix(), text_field, stats, advance):
            if doc.text.strip():
                stats.n_docs += 1
                stats.n_bytes += len(doc.text.encode("utf-8"))
                yield doc
            else:
                stats.n_empty_skipped += 1


def _existing_path(source: str) -> Path:
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"corpus source '{source}' does not exist; pass --data.source a directory of text files, "
                        "a .jsonl or .parquet file, or 'stdlib'")
    return path


def _walk(root: Path, glob: str) -> list[Path]:
    """Files under `root` matching `glob`, sorted by relative path; hidden files and folders (.git, ...) skipped."""
    try:
        matches = list(root.glob(glob))
    except (ValueError, NotImplementedError) as e:
        raise ConfigError(f"invalid --data.glob '{glob}' ({e}); pass a relative pattern such as '**/*.txt'") from None
    files = [p for p in matches
             if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _bytes_progress(progress: Progress | None, files: list[Path]) -> Callable[[int], None]:
    """A callback advancing `progress` by n bytes out of the files' total size."""
    if progress is None:
        return lambda n: None
    total = sum(p.stat().st_size for p in files)
    return lambda n: progress(n, total)


def _decode(raw: bytes) -> tuple[str, int]:
    """UTF-8 decode with U+FFFD for invalid sequences; returns (text, number of sequences replaced)."""
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        # Every U+FFFD in the output is either a replaced sequence or a genuine, validly encoded U+FFFD (EF BF BD).
        return text, text.count(_UTF8_REPLACEMENT) - raw.count(_UTF8_REPLACEMENT.encode("utf-8"))


def _clean(text: str) -> tuple[str, int]:
    """Replace lone surrogates (legal in JSON and Python strings, not in UTF-8) with U+FFFD; returns (text, count)."""
    try:
        text.encode("utf-8")
        return text, 0
    except UnicodeEncodeError:
        cleaned = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return cleaned, cleaned.count(_UTF8_REPLACEMENT) - text.count(_UTF8_REPLACEMENT)


def _iter_text_files(root: Path, files: list[Path], stats: SourceStats,
                     advance: Callable[[int], None]) -> Iterator[Document]:
    for file in files:
        raw = file.read_bytes()
        stats.n_files += 1
        advance(len(raw))
        if b"\0" in raw[:BINARY_SNIFF_BYTES]:
            stats.n_binary_skipped += 1
            continue
        text, n_replaced = _decode(raw)
        if not text.strip():
            stats.n_empty_skipped += 1
            continue
        stats.n_replaced_chars += n_replaced
        stats.n_docs += 1
        stats.n_bytes += len(text.encode("utf-8"))
        yield Document(file.relative_to(root).as_posix(), text)


def _missing_field(file: Path, where: str, text_field: str, found: list[str]) -> DataError:
    return DataError(f"{file}{where} has no field '{text_field}' (found: {', '.join(map(str, found)) or 'none'}); "
                     "pass --data.text_field NAME")


def _field_text(value: object, file: Path, where: str, text_field: str, stats: SourceStats) -> str:
    if value is None:
        return ""  # a null text is an empty document: skipped and counted
    if not isinstance(value, str):
        raise DataError(f"{file}{where}: field '{text_field}' is a {type(value).__name__}, not a string; "
                        "pass --data.text_field NAME naming a text field")
    text, n_replaced = _clean(value)
    stats.n_replaced_chars += n_replaced
    return text


def _iter_jsonl(file: Path, name: str, text_field: str, stats: SourceStats,
                advance: Callable[[int], None]) -> Iterator[Document]:
    with open(file, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            advance(len(raw))
            if not raw.strip():
                continue
            line, n_replaced = _decode(raw)
            stats.n_replaced_chars += n_replaced
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"invalid JSON at {file}:{line_no} ({e.msg}, column {e.colno}); each line of a "
                                ".jsonl source must be one JSON object") from None
            if not isinstance(record, dict):
                raise DataError(f"{file}:{line_no} is a JSON {type(record).__name__}, not an object; each line of "
                                f"a .jsonl source must be an object with a '{text_field}' field")
            if text_field not in record:
                raise _missing_field(file, f":{line_no}", text_field, list(record))
            yield Document(f"{name}:{line_no}", _field_text(record[text_field], file, f":{line_no}", text_field, stats))


def _iter_parquet(file: Path, name: str, text_field: str, stats: SourceStats,
                  advance: Callable[[int], None]) -> Iterator[Document]:
    import pyarrow.parquet as pq  # imported here: only parquet sources pay for it

    try:
        parquet = pq.ParquetFile(file)
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise DataError(f"cannot read parquet file {file} ({e}); pass a valid .parquet file") from None
    columns = parquet.schema_arrow.names
    if text_field not in columns:
        raise _missing_field(file, "", text_field, columns)
    n_rows, file_bytes, bytes_reported = max(parquet.metadata.num_rows, 1), file.stat().st_size, 0
    row = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
        for value in batch.column(0).to_pylist():
            yield Document(f"{name}:{row}", _field_text(value, file, f" row {row}", text_field, stats))
            row += 1
        done = file_bytes * row // n_rows  # parquet is compressed: report its bytes in proportion to rows read
        advance(done - bytes_reported)
        bytes_reported = done


# ----------------------------------------------------------------------------------------------------------------
# the split and the cached corpus


def _split_point(digest: bytes) -> float:
    return int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)


def split_of(text: str, val_fraction: float) -> str:
    """"val" for a deterministic `val_fraction` of texts (by sha256 of the text), else "train"."""
    return "val" if _split_point(hashlib.sha256(text.encode("utf-8")).digest()) < val_fraction else "train"


def build_corpus(
    source: str,
    out_dir: Path,
    *,
    format: str = "auto",
    glob: str = "**/*",
    text_field: str = "text",
    val_fraction: float = 0.01,
    progress: Progress | None = None,
) -> CorpusStats:
    """Read a source into `out_dir/{train,val}.jsonl` + `stats.json`, atomically replacing any previous corpus.

    The split is `split_of(text, val_fraction)`, with one rescue for small corpora: if val_fraction > 0 and there
    are at least 2 documents but the val split came out empty, the train document with the smallest hash (the one
    closest to the cut; all its identical copies too, as long as train keeps one document) is moved to val, so
    validation always exists. Symmetrically an empty train split receives the val document with the largest hash.
    `progress` advances by source bytes read.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"--data.val_fraction must be in [0, 1), got {val_fraction}")
    fmt = resolve_format(source, format, glob)
    out_dir = Path(out_dir)
    ensure_replaceable(out_dir, "stats.json")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        stats = _write_corpus(source, fmt, glob, text_field, val_fraction, tmp, progress)
        (tmp / "stats.json").write_text(json.dumps({"format_version": CORPUS_FORMAT_VERSION, **asdict(stats)},
                                                   indent=2) + "\n", encoding="utf-8")
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return stats


def _write_corpus(source: str, fmt: str, glob: str, text_field: str, val_fraction: float, out: Path,
                  progress: Progress | None) -> CorpusStats:
    stats = CorpusStats(source=source, format=fmt, val_fraction=val_fraction)
    hasher = hashlib.sha256()
    n_lines = {"train": 0, "val": 0}
    # rescue candidates: (digest, [(doc index, line index)]) of the lowest-hash train / highest-hash val texts
    lowest_train: tuple[bytes, list[tuple[int, int]]] | None = None
    highest_val: tuple[bytes, list[tuple[int, int]]] | None = None
    with open(out / "train.jsonl", "w", encoding="utf-8") as train, \
            open(out / "val.jsonl", "w", encoding="utf-8") as val:
        for doc_index, doc in enumerate(iter_documents(source, fmt, glob, text_field, stats, progress=progress)):
            text_bytes = doc.text.encode("utf-8")
            id_bytes = doc.id.encode("utf-8")
            hasher.update(len(id_bytes).to_bytes(8, "little") + id_bytes + len(text_bytes).to_bytes(8, "little"))
            hasher.update(text_bytes)
            digest = hashlib.sha256(text_bytes).digest()
            split = "val" if _split_point(digest) < val_fraction else "train"
            (val if split == "val" else train).write(json.dumps({"id": doc.id, "text": doc.text},
                                                                ensure_ascii=False) + "\n")
            where = (doc_index, n_lines[split])
            n_lines[split] += 1
            if split == "train":
                stats.train_docs += 1
                stats.train_bytes += len(text_bytes)
                if lowest_train is None or digest < lowest_train[0]:
                    lowest_train = (digest, [where])
                elif digest == lowest_train[0]:
                    lowest_train[1].append(where)
            else:
                stats.val_docs += 1
                stats.val_bytes += len(text_bytes)
                if highest_val is None or digest > highest_val[0]:
                    highest_val = (digest, [where])
                elif digest == highest_val[0]:
                    highest_val[1].append(where)
    if stats.n_docs == 0:
        skipped = f"{_plural(stats.n_binary_skipped, 'binary file')} and {_plural(stats.n_empty_skipped, 'empty file')}"
        raise DataError(f"corpus source '{source}' has no text documents ({skipped} skipped); pass --data.source a "
                        "directory of UTF-8 text files, a .jsonl or .parquet file, or 'stdlib'")
    moved: list[int] = []
    if val_fraction > 0 and stats.n_docs >= 2 and stats.val_docs == 0:
        chosen = lowest_train[1] if len(lowest_train[1]) < stats.train_docs else lowest_train[1][:1]
        n_docs, n_bytes = _move_lines(out / "train.jsonl", out / "val.jsonl", {line for _, line in chosen})
        stats.train_docs, stats.train_bytes = stats.train_docs - n_docs, stats.train_bytes - n_bytes
        stats.val_docs, stats.val_bytes = stats.val_docs + n_docs, stats.val_bytes + n_bytes
        moved = [doc_index for doc_index, _ in chosen]
    elif stats.n_docs >= 2 and stats.train_docs == 0:
        chosen = highest_val[1] if len(highest_val[1]) < stats.val_docs else highest_val[1][:1]
        n_docs, n_bytes = _move_lines(out / "val.jsonl", out / "train.jsonl", {line for _, line in chosen})
        stats.val_docs, stats.val_bytes = stats.val_docs - n_docs, stats.val_bytes - n_bytes
        stats.train_docs, stats.train_bytes = stats.train_docs + n_docs, stats.train_bytes + n_bytes
        moved = [doc_index for doc_index, _ in chosen]
    hasher.update(json.dumps({"val_fraction": val_fraction, "moved": moved}).encode("utf-8"))
    stats.source_hash = hasher.hexdigest()
    return stats


def _move_lines(src: Path, dst: Path, line_indices: set[int]) -> tuple[int, int]:
    """Move the given lines of jsonl `src` to the end of `dst`; returns (lines moved, text bytes moved)."""
    kept = src.with_suffix(".kept")
    n_docs = n_bytes = 0
    with open(src, encoding="utf-8") as fin, open(kept, "w", encoding="utf-8") as fkeep, \
            open(dst, "a", encoding="utf-8") as fdst:
        for i, line in enumerate(fin):
            if i in line_indices:
                fdst.write(line)
                n_docs += 1
                n_bytes += len(json.loads(line)["text"].encode("utf-8"))
            else:
                fkeep.write(line)
    os.replace(kept, src)
    return n_docs, n_bytes


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def load_corpus(out_dir: Path) -> CorpusStats:
    """The stats of a built corpus; DataError if it is missing or corrupt."""
    out_dir = Path(out_dir)
    fix = "run `lmforge corpus build` to (re)build it"
    try:
        meta = json.loads((out_dir / "stats.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"no corpus at {out_dir} (stats.json missing); {fix}") from None
    except (OSError, ValueError) as e:
        raise DataError(f"corpus stats {out_dir / 'stats.json'} are unreadable ({e}); {fix}") from None
    if not isinstance(meta, dict) or meta.get("format_version") != CORPUS_FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise DataError(f"corpus at {out_dir} has format version {version}, this lmforge reads "
                        f"{CORPUS_FORMAT_VERSION}; {fix}")
    names = {f.name for f in fields(CorpusStats)}
    if set(meta) - {"format_version"} != names:
        raise DataError(f"corpus stats {out_dir / 'stats.json'} are corrupt (unexpected fields); {fix}")
    for split in ("train", "val"):
        if not (out_dir / f"{split}.jsonl").is_file():
            raise DataError(f"corpus at {out_dir} is missing {split}.jsonl; {fix}")
    return CorpusStats(**{k: v for k, v in meta.items() if k in names})


def iter_corpus_texts(out_dir: Path, split: str) -> Iterator[str]:
    """The document texts of one split ("train" or "val") of a built corpus, in order."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    path = Path(out_dir) / f"{split}.jsonl"
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"no corpus split at {path}; run `lmforge corpus build` to (re)build it") from None
    with f:
        for line_no, line in enumerate(f, start=1):
            try:
                yield json.loads(line)["text"]
            except (ValueError, KeyError, TypeError):
                raise DataError(f"corpus file {path}:{line_no} is corrupt; run `lmforge corpus build` "
                                "to rebuild it") from None


def ensure_replaceable(final: Path, marker: str) -> None:
    """DataError unless `final` is absent, empty, or a cache folder of ours (it holds `marker`): a cache folder is
    replaced as a whole, and a mistyped path must not delete someone's files."""
    if final.is_file() or (final.is_dir() and any(final.iterdir()) and not (final / marker).exists()):
        raise DataError(f"refusing to replace {final}: it is not empty and holds no {marker}, so it is not an "
                        "lmforge cache; pass a new or empty folder")
