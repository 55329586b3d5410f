"""Stage 1, prepare: training text -> fixed-length token blocks + validation + calibration.

Outputs (``prepare/``): ``train.npy``, ``val.npy``, ``calib.npy`` (uint16/uint32
[blocks, seq_len], memory-mappable) and ``manifest.json`` (source, sha256 of
the inputs, tokenizer, counts, and the sha256 of each ``.npy``, hashed while it is
written). Same inputs give the same bytes. Readers (:func:`load_blocks`) check the
sha256 once per stage run; a block file that fails it is refused by name, and
this stage rebuilds it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ast_core.atomic import atomic_write_json
from ast_core.integrity import HashingWriter, IntegrityError, verify_file
from ast_core.data import describe_source, load_texts, split_blocks, tokenize_blocks
from ast_core.models import load_tokenizer, tokenizer_fingerprint

from .common import RunContext, StageError, hash_json, log


def fingerprint(ctx: RunContext) -> str:
    return hash_json({"data": ctx.cfg.data.model_dump(mode="json"), "seed": ctx.cfg.seed,
                      "tokenizer": ctx.cfg.model.student})


SPLITS = ("train", "val", "calib")


def _save_npy(path: Path, arr: np.ndarray) -> str:
    """Write ``arr`` as .npy (temp name, then rename); returns the sha256 of the bytes written."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        writer = HashingWriter(fh)
        np.save(writer, arr)  # np.save streams through writer.write: hashed while written
    tmp.replace(path)
    return writer.hexdigest()


def _damaged(ctx: RunContext) -> str | None:
    """Why the finished stage's block files cannot be used (a failed checksum), or None."""
    try:
        for split in SPLITS:
            load_blocks(ctx, split)
    except IntegrityError as exc:
        return str(exc)
    return None


def run(ctx: RunContext) -> dict:
    fp = fingerprint(ctx)
    if ctx.is_done("prepare", fp):
        if (why := _damaged(ctx)) is None:
            log.info("prepare: up to date")
            return ctx.done("prepare")["manifest"]
        log.warning("prepare: rebuilding the token blocks: %s", why)
    d, cfg = ctx.cfg.data, ctx.cfg
    tok = load_tokenizer(cfg.model.student, trust_remote_code=cfg.model.trust_remote_code)
    texts = load_texts(d.source, d.split, max_docs=d.max_docs)
    blocks = tokenize_blocks(texts, tok, d.seq_len)
    try:
        train, val, calib = split_blocks(blocks, n_val=d.val_blocks, calib_n=d.calib_blocks, seed=cfg.seed)
    except ValueError as exc:
        raise StageError(f"data.val_blocks / data.calib_blocks do not fit the {len(blocks)} blocks of "
                         f"{d.source!r}: {exc}") from None
    if d.max_train_blocks is not None:
        train = train[: d.max_train_blocks]
    out = ctx.stage_dir("prepare")
    out.mkdir(parents=True, exist_ok=True)
    hashes = {name: _save_npy(out / f"{name}.npy", arr)
              for name, arr in (("train", train), ("val", val), ("calib", calib))}
    manifest = {
        "source": describe_source(d.source, d.split),
        "tokenizer": {"spec": cfg.model.student, "fingerprint": tokenizer_fingerprint(tok), "vocab": len(tok)},
        "seq_len": d.seq_len,
        "counts": {"documents": len(texts), "train_blocks": int(len(train)), "val_blocks": int(len(val)),
                   "calib_blocks": int(len(calib)), "train_tokens": int(train.size)},
        "dtype": str(train.dtype),
        "sha256": hashes,
    }
    manifest["hash"] = hash_json(manifest)
    atomic_write_json(out / "manifest.json", manifest)
    ctx.mark_done("prepare", fp, manifest=manifest)
    log.info("prepare: %d train / %d val / %d calib blocks of %d tokens", len(train), len(val), len(calib),
             d.seq_len)
    return manifest


def load_blocks(ctx: RunContext, split: str) -> np.ndarray:
    """One split's token blocks (memory-mapped), after checking their sha256 against the manifest."""
    path = ctx.stage_dir("prepare") / f"{split}.npy"
    digest = ctx.require("prepare")["manifest"].get("sha256", {}).get(split)
    if digest is not None:  # every manifest this project wrote has it
        with ctx.checked("prepare"):
            verify_file(path, digest, "token blocks")
    return np.load(path, mmap_mode="r")
