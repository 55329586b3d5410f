"""Text data sources, offline first, and their cut into fixed-length token blocks.

A *data source* is one string (so params files, CLI flags and MLflow params all
carry it as a single value):

- a local path: a ``.jsonl`` / ``.json`` (JSON lines, optionally ``.gz``) with a
  text field, a ``.txt`` / ``.raw`` file (the whole file is one document), or a
  directory of such files (sorted by name; the split is ignored);
- a named source: ``wikitext2`` (splits test / validation / train), ``c4`` and
  ``c4-realnewslike`` (split train from the mirror; others from the hub);
- any other Hugging Face hub data set id, optionally ``id:config``.

Named sources are read from the local mirror (:func:`data_mirror`) when the file
is there and only otherwise from the hub. With ``HF_DATASETS_OFFLINE`` or
``HF_HUB_OFFLINE`` set, a source the mirror lacks is a :class:`DataSourceError`
that names the source, the split and the mirror searched; nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import itertools
import json
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from transformers import PreTrainedTokenizerBase
from .errors import ASTError

MIRROR_ENV = "AST_DATA_MIRROR"
OFFLINE_ENVS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
HUB_STREAM_DOC_LIMIT = 10_000  # documents taken from a streamed hub split when max_docs is None
TEXT_SUFFIXES = (".txt", ".raw")
JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
SPLIT_ALIASES = {"valid": "validation", "val": "validation", "dev": "validation"}


class DataSourceError(ASTError, ValueError):
    """A data source that cannot be read; the message names the source (and file/line)."""


@dataclass(frozen=True)
class NamedSource:
    hub: tuple[str, ...]           # positional args of datasets.load_dataset
    files: dict[str, str]          # split -> path inside the mirror
    streaming: bool = False        # stream from the hub (C4 is far too big to download)
    wikitext: bool = False         # raw files are WikiText rows, documents are articles
    aliases: dict[str, str] = field(default_factory=dict)


_WIKI = "wikitext-2-raw-v1"
NAMED_SOURCES: dict[str, NamedSource] = {
    "wikitext2": NamedSource(("wikitext", _WIKI), {"test": f"{_WIKI}/wiki.test.raw",
                                                   "validation": f"{_WIKI}/wiki.valid.raw",
                                                   "train": f"{_WIKI}/wiki.train.raw"}, wikitext=True),
    "c4": NamedSource(("allenai/c4", "en"), {"train": "c4/c4-en-train.00000-of-01024.first1000.jsonl"},
                      streaming=True),
    "c4-realnewslike": NamedSource(("allenai/c4", "realnewslike"),
                                   {"train": "c4/c4-realnewslike-train.00000-of-00512.first1000.jsonl"},
                                   streaming=True),
}


# ----------------------------------------------------------------------------- resolution

def data_mirror() -> Path | None:
    """The local data mirror: ``$AST_DATA_MIRROR``, else ``<repo>/../shared/data`` if it exists."""
    env = os.environ.get(MIRROR_ENV)
    if env:
        return Path(env).expanduser()
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return default if default.is_dir() else None


def hub_offline() -> bool:
    """True when the HF offline switches forbid downloads (any value other than 0/false/no/off)."""
    return any(os.environ.get(k, "").strip().lower() not in ("", "0", "false", "no", "off")
               for k in OFFLINE_ENVS)


def _norm_split(split: str) -> str:
    return SPLIT_ALIASES.get(split, split)


def _looks_like_path(source: str) -> bool:
    """Hub ids are ``name`` or ``owner/name``; anything else path-like is a (missing) local path."""
    return (source.startswith((".", "/", "~")) or source.count("/") > 1
            or source.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES))


def _mirror_file(name: str, split: str) -> Path | None:
    rel = NAMED_SOURCES[name].files.get(split)
    mirror = data_mirror()
    if rel is None or mirror is None:
        return None
    path = mirror / rel
    return path if path.is_file() else None


def _hub_load(source: str, split: str, hub: tuple[str, ...], streaming: bool, max_docs: int | None,
              text_field: str = "text") -> list[str]:
    """Read the ``text`` column of a hub split; refuses (no network) when offline."""
    if hub_offline():
        mirror = data_mirror()
        where = f"mirror {mirror}" if mirror is not None else f"no mirror (set {MIRROR_ENV})"
        raise DataSourceError(
            f"data source {source!r} split {split!r} is not in the local {where} and the hub is "
            f"offline ({'/'.join(k for k in OFFLINE_ENVS if os.environ.get(k))} set); "
            f"would have loaded {'/'.join(hub)} from the Hugging Face hub")
    import datasets  # lazy: heavy, and only needed when the mirror lacks the data

    try:
        ds = datasets.load_dataset(*hub, split=split, streaming=streaming)
        limit = max_docs if max_docs is not None else (HUB_STREAM_DOC_LIMIT if streaming else None)
        return [row[text_field] for row in itertools.islice(ds, limit)]
    except Exception as exc:  # the hub's own errors do not name our source string
        raise DataSourceError(f"could not load data source {source!r} split {split!r} "
                              f"from the hub as {'/'.join(hub)}: {exc}") from exc


# ----------------------------------------------------------------------------- WikiText-2

def _wikitext_rows_from_raw(text: str) -> list[str]:
    """The HF ``datasets`` rows of a raw WikiText file.

    HF turns each whitespace-only line into ``""`` and keeps the others with
    their trailing newline; the last line (after the final newline) is empty.
    """
    rows = [line if line.strip() else "" for line in text.split("\n")[:-1]]
    return [r + "\n" if r else "" for r in rows]


def wikitext2_rows(split: str = "test") -> list[str]:
    """WikiText-2 (raw) rows exactly as ``load_dataset("wikitext", "wikitext-2-raw-v1")[split]["text"]``."""
    split = _norm_split(split)
    if split not in NAMED_SOURCES["wikitext2"].files:
        raise DataSourceError(f"wikitext2 has no split {split!r}; available: test, validation, train")
    path = _mirror_file("wikitext2", split)
    if path is not None:
        return _wikitext_rows_from_raw(_read_text(path))
    return _hub_load("wikitext2", split, NAMED_SOURCES["wikitext2"].hub, False, None)


def wikitext2_eval_text(split: str = "test") -> str:
    """The perplexity string of GPTQ/SparseGPT/Wanda: the HF rows joined with ``"\\n\\n"``."""
    return "\n\n".join(wikitext2_rows(split))


_ARTICLE_TITLE = re.compile(r" = [^=].* = \n")


def wikitext_articles(rows: Sequence[str]) -> list[str]:
    """Group WikiText rows into articles (the natural documents of the corpus).

    An article starts at a level-1 heading row `` = Title = `` that sits between
    two empty rows (equations like `` = 1 henry … = `` do not). Each article is
    its rows joined with ``"\\n\\n"``, so ``"\\n\\n".join(articles)`` equals the
    evaluation string: training on articles sees the same text as evaluation.
    """
    starts = [i for i in range(1, len(rows) - 1)
              if not rows[i - 1] and not rows[i + 1] and _ARTICLE_TITLE.fullmatch(rows[i])]
    bounds = [0] + starts[1:] + [len(rows)] if starts else [0, len(rows)]
    return ["\n\n".join(rows[a:b]) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


# ----------------------------------------------------------------------------- local files

def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.name.endswith(".gz") else \
        open(path, encoding="utf-8")


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """File-level read failures (not UTF-8, not gzip, truncated gzip) name the file, not just the codec."""
    try:
        yield
    except UnicodeDecodeError as exc:
        raise DataSourceError(f"data file {path} is not UTF-8 text ({exc.reason})") from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataSourceError(f"data file {path} is not a valid gzip file ({exc})") from None


def _read_text(path: Path) -> str:
    with _reading(path), _open_text(path) as fh:
        text = fh.read()
    if not text.strip():
        raise DataSourceError(f"data file {path} is empty")
    return text


def _read_jsonl(path: Path, text_field: str, max_docs: int | None) -> list[str]:
    docs: list[str] = []
    with _reading(path), _open_text(path) as fh:
        for lineno, line in enumerate(fh, start=1):
            if max_docs is not None and len(docs) >= max_docs:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataSourceError(f"{path}:{lineno}: not valid JSON ({exc.msg}); "
                                      "expected one JSON object per line") from exc
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise DataSourceError(f"{path}:{lineno}: expected an object with a string "
                                      f"{text_field!r} field")
            docs.append(record[text_field])
    if not docs and max_docs != 0:
        raise DataSourceError(f"data file {path} is empty (no JSON lines)")
    return docs


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir()
                   if p.is_file() and p.name.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES))
    if not files:
        raise DataSourceError(f"data directory {path} has no {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} files")
    return files


def _read_local(path: Path, max_docs: int | None, text_field: str) -> list[str]:
    docs: list[str] = []
    for f in _local_files(path):
        left = None if max_docs is None else max_docs - len(docs)
        if left is not None and left <= 0:
            break
        if f.name.endswith(JSONL_SUFFIXES):
            docs.extend(_read_jsonl(f, text_field, left))
        elif f.name.endswith(TEXT_SUFFIXES):
            docs.append(_read_text(f))
        else:
            raise DataSourceError(f"unsupported data file {f} (use {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)})")
    return docs


# ----------------------------------------------------------------------------- public loading

def load_texts(source: str, split: str = "train", max_docs: int | None = None,
               text_field: str = "text") -> list[str]:
    """The documents of a data source, in source order, at most ``max_docs``.

    Local paths win over names; named sources read the mirror before the hub.
    WikiText-2 documents are its articles (:func:`wikitext_articles`); JSON-lines
    documents are each record's ``text_field``; a text file is one document.
    """
    if max_docs is not None and max_docs < 0:
        raise ValueError(f"max_docs must be >= 0, got {max_docs}")
    path = Path(source).expanduser()
    if path.exists():
        return _read_local(path, max_docs, text_field)
    split = _norm_split(split)
    if source in NAMED_SOURCES:
        named = NAMED_SOURCES[source]
        if named.wikitext:
            return wikitext_articles(wikitext2_rows(split))[:max_docs]
        mirrored = _mirror_file(source, split)
        if mirrored is not None:
            return _read_jsonl(mirrored, "text", max_docs)
        return _hub_load(source, split, named.hub, named.streaming, max_docs)
    if _looks_like_path(source):
        raise DataSourceError(f"local data path not found: {source}")
    hub_id, _, config = source.partition(":")
    return _hub_load(source, split, (hub_id, config) if config else (hub_id,), False, max_docs, text_field)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def describe_source(source: str, split: str = "train") -> dict:
    """Where a source's data comes from, for manifests: resolved file(s) with sha256, or the hub name.

    A directory gets one sha256 over its files' names and hashes, so any change
    to any file changes it.
    """
    split = _norm_split(split)
    path = Path(source).expanduser()
    if path.exists():
        files = [{"path": str(f.resolve()), "sha256": sha256_file(f), "bytes": f.stat().st_size}
                 for f in _local_files(path)]
        digest = files[0]["sha256"] if path.is_file() else hashlib.sha256(
            "".join(f"{Path(f['path']).name}\0{f['sha256']}\n" for f in files).encode()).hexdigest()
        return {"source": source, "split": None, "kind": "local", "path": str(path.resolve()),
                "sha256": digest, "files": files}
    if source in NAMED_SOURCES:
        mirrored = _mirror_file(source, split)
        if mirrored is not None:
            return {"source": source, "split": split, "kind": "mirror", "path": str(mirrored.resolve()),
                    "sha256": sha256_file(mirrored), "bytes": mirrored.stat().st_size}
        return {"source": source, "split": split, "kind": "hub", "hub": "/".join(NAMED_SOURCES[source].hub)}
    if _looks_like_path(source):
        raise DataSourceError(f"local data path not found: {source}")
    return {"source": source, "split": split, "kind": "hub", "hub": source.replace(":", "/")}


# ----------------------------------------------------------------------------- token blocks

def token_dtype(tokenizer: PreTrainedTokenizerBase) -> np.dtype:
    """uint16 when every id fits (vocab < 65536, e.g. SmolLM2's 49152), else uint32."""
    return np.dtype(np.uint16) if len(tokenizer) < 2 ** 16 else np.dtype(np.uint32)


def tokenize_blocks(texts: Iterable[str], tokenizer: PreTrainedTokenizerBase, seq_len: int,
                    add_eos: bool = True, batch_docs: int = 1000) -> np.ndarray:
    """Documents -> one token stream -> ``[n_blocks, seq_len]`` non-overlapping blocks.

    Stream = doc_1 EOS doc_2 EOS … doc_n EOS (EOS after every document when
    ``add_eos``; no BOS or other special tokens, so documents are separated only
    by EOS). Blocks are ``stream[i·L:(i+1)·L]``; the last ``len % L`` tokens are
    dropped. Deterministic: the same texts and tokenizer give the same bytes.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    eos = tokenizer.eos_token_id
    if add_eos and eos is None:
        raise ValueError(f"{type(tokenizer).__name__} has no EOS token; pass add_eos=False")
    dtype = token_dtype(tokenizer)
    texts = list(texts)
    parts: list[np.ndarray] = []
    for start in range(0, len(texts), batch_docs):
        batch = tokenizer(texts[start:start + batch_docs], add_special_tokens=False, verbose=False)["input_ids"]
        seqs = [ids + [eos] for ids in batch] if add_eos else batch
        total = sum(len(s) for s in seqs)
        parts.append(np.fromiter(itertools.chain.from_iterable(seqs), dtype=dtype, count=total))
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
    n_blocks = len(stream) // seq_len
    if n_blocks == 0:
        raise DataSourceError(f"text too short for one block: {len(stream)} tokens from {len(texts)} "
                         f"documents, need at least seq_len={seq_len}")
    return stream[: n_blocks * seq_len].reshape(n_blocks, seq_len).copy()


def split_blocks(blocks: np.ndarray, val_fraction: float | None = None, n_val: int | None = None,
                 calib_n: int = 0, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic (train, val, calib) split of token blocks.

    One permutation from ``seed`` picks the validation blocks (``n_val``, or
    ``round(val_fraction · n)`` but at least one when the fraction is > 0); the
    rest is train, kept in source order. Calibration blocks are ``calib_n``
    training blocks drawn by the same permutation: calibration is a sample of
    the training data (as Wanda/SparseGPT use it) and never touches validation.
    """
    n = len(blocks)
    if val_fraction is not None and n_val is not None:
        raise ValueError("give val_fraction or n_val, not both")
    if val_fraction is not None:
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        n_val = max(1, round(val_fraction * n)) if val_fraction > 0 else 0
    n_val = n_val or 0
    if n_val < 0 or n_val >= n:
        raise ValueError(f"n_val={n_val} must leave at least one of {n} blocks for training")
    if not 0 <= calib_n <= n - n_val:
        raise ValueError(f"calib_n={calib_n} exceeds the {n - n_val} training blocks")
    perm = np.random.default_rng(seed).permutation(n)
    val_idx = np.sort(perm[:n_val])
    train_idx = np.sort(perm[n_val:])
    calib_idx = perm[n_val:n_val + calib_n]
    return blocks[train_idx], blocks[val_idx], blocks[calib_idx]
