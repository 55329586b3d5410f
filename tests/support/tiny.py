"""The tiny LLaMA runs the training tests share: one definition of the student, teacher and data.

Each test file keeps its own numbers (seeds, shapes differ between files and
decide what the tests compute): they are the arguments here, not copies of
the code. ``tests/conftest.py`` turns the common case into the ``blocks`` and
``teacher`` fixtures.
"""

from __future__ import annotations

import numpy as np
import torch

from ast_core.masks import magnitude_score, nm_mask
from ast_core.models import load_model
from ast_core.slorb import add_slorb
from ast_core.sparse import sparse_layers, sparsify


def magnitude_sparse(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its linears made sparse, each masked 2:4 by weight magnitude (in place; returned)."""
    sparsify(model)
    for _, layer in sparse_layers(model):
        layer.set_mask(nm_mask(magnitude_score(layer.weight)))
    return model


def student(slorb: bool = True, seed: int = 0) -> torch.nn.Module:
    """The tiny sparse student: magnitude 2:4 masks, SLoRB k = 16 unless ``slorb=False``."""
    model = magnitude_sparse(load_model("tiny:llama", seed=seed))
    if slorb:
        add_slorb(model, 16)
    return model


def teacher(seed: int = 0) -> torch.nn.Module:
    """The tiny dense teacher (a seed other than the student's gives it different weights)."""
    return load_model("tiny:llama", seed=seed)


def blocks(n: int = 16, seq_len: int = 16, vocab: int = 2000, seed: int = 0) -> np.ndarray:
    """``n`` random token blocks of ``seq_len`` ids below ``vocab`` (uint16, as the data stage writes them)."""
    return np.random.default_rng(seed).integers(0, vocab, size=(n, seq_len)).astype(np.uint16)
