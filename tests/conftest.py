"""Shared test set-up: offline, no network, deterministic, and the real model once.

Any attempt to open a network connection fails the test: nothing in the test
suite may download a model or a data set.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from support import tiny

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("AST_TRACKING", "off")  # tests that check tracking point MLflow at a temp store
os.environ.setdefault("AST_DENSE_CACHE", "off")  # tests measure the dense teacher; one test checks the cache
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


class NetworkAttempt(RuntimeError):
    pass


_real_connect = socket.socket.connect


def _guarded_connect(self, address):  # type: ignore[no-untyped-def]
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and (host.startswith("127.") or host in ("localhost", "::1") or host.startswith("/")):
        return _real_connect(self, address)
    if self.family == socket.AF_UNIX:
        return _real_connect(self, address)
    raise NetworkAttempt(f"test tried to open a network connection to {address!r}")


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket.socket, "connect", _guarded_connect)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"real data mirror not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M (float32, eval mode). Loaded once per session."""
    from ast_core.models import load_model
    return load_model("embedded:smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from ast_core.models import load_tokenizer
    return load_tokenizer("embedded:smollm2-135m")


@pytest.fixture(scope="session")
def wikitext_test_text(shared_data: Path) -> str:
    """WikiText-2 test rows joined with "\\n\\n", exactly as the papers evaluate."""
    raw = (shared_data / "wikitext-2-raw-v1" / "wiki.test.raw").read_text(encoding="utf-8")
    rows = [line if line.strip() else "" for line in raw.split("\n")[:-1]]
    rows = [r + "\n" if r else "" for r in rows]
    return "\n\n".join(rows)


# ----------------------------------------------------------------------------- tiny training runs

@pytest.fixture(scope="module")
def blocks() -> np.ndarray:
    """16 random blocks × 16 tokens (seed 0, ids < 2000); a file with other data overrides this fixture
    with its own ``tiny.blocks(...)`` call."""
    return tiny.blocks()


@pytest.fixture(scope="module")
def teacher() -> torch.nn.Module:
    """The tiny LLaMA teacher, seed 0; a file with another teacher seed overrides this fixture."""
    return tiny.teacher()
