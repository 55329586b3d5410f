"""The tiny run that tests/test_ddp.py trains in one process and under torchrun."""

from __future__ import annotations

import numpy as np
import torch

from ast_core.masks import magnitude_score, nm_mask
from ast_core.models import load_model
from ast_core.slorb import add_slorb
from ast_core.sparse import sparse_layers, sparsify
from tasks.config import TrainConfig

SEED = 0
# global batch 4 = 2 ranks x 2 blocks; refresh every 2 steps so masks adapt during the run
CFG = TrainConfig(method="ast-boosted", steps=6, batch_size=4, lr=3e-3, min_lr=3e-4, warmup_steps=1,
                  lambda_max=1e-2, t0_steps=2, refresh_every=2, checkpoint_every=2, slorb_group=16)


def blocks() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 2000, size=(16, 16)).astype(np.uint16)


def student(slorb: bool = True) -> torch.nn.Module:
    """The tiny sparse student (magnitude 2:4 masks; SLoRB k = 16 unless ``slorb=False``),
    also the one tests/support/train_worker.py kills and resumes."""
    model = load_model("tiny:llama", seed=SEED)
    sparsify(model)
    for _, layer in sparse_layers(model):
        layer.set_mask(nm_mask(magnitude_score(layer.weight)))
    if slorb:
        add_slorb(model, 16)
    return model


def teacher() -> torch.nn.Module:
    return load_model("tiny:llama", seed=1)
