"""CUDA 2:4 kernels: an honest skip without CUDA; real checks where a GPU is present."""

from __future__ import annotations

import copy
import importlib.util
from types import SimpleNamespace
from pathlib import Path

import pytest
import torch

from ast_core import kernels
from ast_core.kernels import (KernelsUnavailable, compare_outputs, cuda_available, kernel_report, speed_table,
                              speed_table_markdown, to_semi_structured)
from ast_core.models import load_model
from ast_core.sparse import densify, sparse_layers
from support import tiny

HAS_CUDA = cuda_available()[0]
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason=cuda_available()[1])
BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu_kernels.py"


def _no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_cuda_available_reports_a_skip_reason_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_cuda(monkeypatch)
    ok, reason = cuda_available()
    assert ok is False and reason.startswith("skipped: no CUDA")


def test_speed_table_raises_the_skip_reason_instead_of_returning_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_cuda(monkeypatch)
    with pytest.raises(KernelsUnavailable, match="skipped: no CUDA"):
        speed_table([(64, 64)], [1])


def test_to_semi_structured_refuses_without_cuda_and_leaves_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_cuda(monkeypatch)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(KernelsUnavailable, match="skipped: no CUDA"):
        to_semi_structured(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_kernel_report_raises_the_skip_reason_and_writes_nothing(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    _no_cuda(monkeypatch)
    with pytest.raises(KernelsUnavailable, match="skipped: no CUDA"):
        kernel_report(torch.nn.Linear(8, 8), [1, 16], tmp_path / "kernels")
    assert not (tmp_path / "kernels").exists()


def test_speed_table_markdown_marks_slower_rows_and_failed_checks() -> None:
    rows = [dict(out=4096, **{"in": 4096}, tokens=1, dense_ms=0.02, sparse_ms=0.03, speedup=2 / 3,
                 rel_err=1e-3, ok=True),
            dict(out=4096, **{"in": 4096}, tokens=4096, dense_ms=0.5, sparse_ms=0.35, speedup=0.5 / 0.35,
                 rel_err=5e-2, ok=False)]
    md = speed_table_markdown(rows).splitlines()
    assert md[0].startswith("| out × in | tokens")
    assert "0.67× (slower)" in md[2] and "FAIL" not in md[2]
    assert "1.43×" in md[3] and "(slower)" not in md[3] and md[3].endswith("FAIL |")


class _TinyLM(torch.nn.Module):
    """Embedding + head returning ``.logits`` like a transformers causal LM."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.head = torch.nn.Embedding(50, 16), torch.nn.Linear(16, 50)

    def forward(self, ids: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.head(self.emb(ids)))


def test_compare_outputs_measures_logit_differences() -> None:
    model = _TinyLM()
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.head.bias[7] += 0.5
    ids = torch.randint(0, 50, (2, 8))
    ref = model(ids).logits.detach()
    same = compare_outputs(model, copy.deepcopy(model), ids)
    diff = compare_outputs(model, other, ids)
    assert same == {"max_abs": 0.0, "mean_abs": 0.0, "max_rel": 0.0}
    assert diff["max_abs"] == pytest.approx(0.5, abs=1e-6)
    assert diff["max_rel"] == pytest.approx(0.5 / float(ref.abs().max()), rel=1e-5)


def test_bench_script_skips_without_cuda_and_writes_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    _no_cuda(monkeypatch)
    spec = importlib.util.spec_from_file_location("gpu_kernels_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--out-dir", str(tmp_path / "results")]) == 0
    assert "no CUDA: skipped" in capsys.readouterr().out
    assert not (tmp_path / "results").exists()


@needs_cuda
def test_semi_structured_model_matches_dense_masked_model_on_gpu() -> None:
    model = tiny.magnitude_sparse(load_model("tiny:llama", dtype=torch.bfloat16))
    model.to("cuda")
    dense = copy.deepcopy(model)
    densify(dense)
    info = to_semi_structured(model, torch.bfloat16)
    assert len(info["converted"]) == 14 and info["skipped"] == [] and not list(sparse_layers(model))
    ids = torch.randint(0, 1000, (2, 16), device="cuda")
    diff = compare_outputs(dense, model, ids)
    assert diff["max_rel"] < 2e-2


@needs_cuda
def test_speed_table_rows_are_checked_against_dense_on_gpu() -> None:
    rows = speed_table([(256, 256)], [16, 256], iters=5, inner=2, warmup=2, graphs=True)
    assert len(rows) == 2 and all(r["ok"] and r["dense_ms"] > 0 and r["sparse_ms"] > 0 for r in rows)
    assert all(r["dense_graph_ms"] > 0 for r in rows)  # dense F.linear always captures
    assert all(r["backend"] == kernels.default_backend() for r in rows)


@needs_cuda
def test_kernel_report_covers_every_layer_shape_and_leaves_the_model(tmp_path: Path) -> None:
    model = tiny.magnitude_sparse(load_model("tiny:llama"))
    report = kernel_report(model, [16], tmp_path, iters=3)
    assert {(r["out"], r["in"]) for r in report["rows"]} == {(64, 64), (32, 64), (128, 64), (64, 128)}
    assert report["converted"] == 14 and report["logit_diff"]["max_rel"] < 2e-2
    assert (tmp_path / "speed_table.md").exists() and len(list(sparse_layers(model))) == 14
