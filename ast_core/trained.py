"""The trained-model artifact (``train/final/``): what the train stage writes and compile/evaluate read.

``model.safetensors`` holds every tensor of the trained student (weights,
masks, SLoRB), tied tensors once; ``meta.json`` says how to rebuild the
modules those tensors fit: the model spec and dtype, the N:M pattern and
excluded layers, the method and its SLoRB group. Loading rebuilds the same
modules the run trained (dense weights → sparsify → SLoRB) and loads the
tensors strictly, so a file that does not fit names what is missing. The
weights' sha256 is recorded in ``meta.json`` when written and checked by every
reader (an older run recorded none and is read unchecked).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .atomic import atomic_path, atomic_write_json
from .checkpoint import load_model_tensors, state_dict_tensors
from .integrity import sha256_file, verify_file
from .models import load_model, torch_dtype
from .registry import method as method_spec
from .slorb import add_slorb
from .sparse import sparsify

WEIGHTS, META = "model.safetensors", "meta.json"


def save_trained(final: Path, model: torch.nn.Module | dict[str, torch.Tensor], meta: dict) -> None:
    """Write the model (or its already-gathered tensors, under FSDP) and ``meta`` to ``final/``."""
    final = Path(final)
    with atomic_path(final / WEIGHTS) as tmp:
        save_file(model if isinstance(model, dict) else state_dict_tensors(model), str(tmp))
        digest = sha256_file(tmp)  # just written: read back from the page cache (~0.3 s for SmolLM2-135M)
    atomic_write_json(final / META, {**meta, "sha256": {WEIGHTS: digest}})


def read_meta(final: Path) -> dict:
    return json.loads((Path(final) / META).read_text())


def verify_trained(final: Path, meta: dict | None = None) -> None:
    """Check ``final/model.safetensors`` against its recorded sha256 (IntegrityError naming the file)."""
    meta = read_meta(final) if meta is None else meta
    digest = (meta.get("sha256") or {}).get(WEIGHTS)
    if digest is not None:
        verify_file(Path(final) / WEIGHTS, digest, "trained model")


def load_trained(final: Path, trust_remote_code: bool = False) -> torch.nn.Module:
    """Rebuild the trained model from ``final/`` (the same modules it was trained with), in eval mode."""
    final = Path(final)
    meta = read_meta(final)
    verify_trained(final, meta)
    model = load_model(meta["student"], torch_dtype(meta["dtype"]), seed=meta["seed"],
                       trust_remote_code=trust_remote_code)
    if method_spec(meta["method"]).sparse:
        sparsify(model, meta["n"], meta["m"], meta["exclude"])
    if meta.get("slorb_group"):
        add_slorb(model, meta["slorb_group"], meta["slorb_trainable_projection"])
    load_model_tensors(model, load_file(str(final / WEIGHTS)), str(final / WEIGHTS))
    model.eval()
    return model
