"""Optional CUDA backend: 2:4 weights as ``torch.sparse`` semi-structured tensors.

A backend only accelerates: :func:`to_semi_structured` turns each
``SparseLinear``'s effective weight ``W ⊙ m`` into a
``torch.sparse.to_sparse_semi_structured`` tensor (cuSPARSELt, or CUTLASS) held
by a small :class:`SemiStructuredLinear`; the model computes the same function
up to the kernels' accumulation order (checked by :func:`compare_outputs`).
SLoRB stays a small dense side branch.

Everything here needs a CUDA GPU with sparse tensor cores (compute capability
≥ 8.0). Without one, every entry point raises :class:`KernelsUnavailable` with
the reason ("skipped: no CUDA ..."): it never falls back to dense numbers that
could be mistaken for sparse ones. :func:`speed_table_markdown` and
:func:`compare_outputs` are plain tensor arithmetic and work anywhere.
"""

from __future__ import annotations

import copy
import json
import statistics
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .masks import magnitude_score, nm_mask, violations
from .sparse import sparse_layers
from .errors import ASTError


class KernelsUnavailable(ASTError, RuntimeError):
    """No usable CUDA semi-structured backend here; ``str(err)`` is the skip reason."""


def cuda_available() -> tuple[bool, str]:
    """(usable, reason): CUDA present, a GPU of compute capability ≥ 8.0, semi-structured API."""
    if not torch.cuda.is_available():
        built = "built without CUDA" if torch.version.cuda is None else "no CUDA device visible"
        return False, f"skipped: no CUDA (torch {torch.__version__}: {built})"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return False, (f"skipped: no CUDA 2:4 support on {torch.cuda.get_device_name()} "
                       f"(compute capability {major}.{minor} < 8.0)")
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return False, f"skipped: torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured"
    return True, f"CUDA {torch.version.cuda} on {torch.cuda.get_device_name()} (sm_{major}{minor}), " \
                 f"backend {default_backend()}"


def require_cuda() -> None:
    ok, reason = cuda_available()
    if not ok:
        raise KernelsUnavailable(reason)


def default_backend() -> str:
    """``"cusparselt"`` when torch was built with it, else ``"cutlass"``."""
    lt = getattr(torch.backends, "cusparselt", None)
    return "cusparselt" if lt is not None and lt.is_available() else "cutlass"


@contextmanager
def _backend(name: str) -> Iterator[None]:
    if name not in ("cusparselt", "cutlass"):
        raise ValueError(f"backend must be 'cusparselt' or 'cutlass', got {name!r}")
    cls = torch.sparse.SparseSemiStructuredTensor
    old = cls._FORCE_CUTLASS
    cls._FORCE_CUTLASS = name == "cutlass"
    try:
        yield
    finally:
        cls._FORCE_CUTLASS = old


def semi_structured_weight(weight: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """``to_sparse_semi_structured`` of a CUDA 2:4 weight ``[out, in]`` (bf16/fp16)."""
    require_cuda()
    with _backend(backend or default_backend()):
        return torch.sparse.to_sparse_semi_structured(weight.contiguous())


def shape_supported(out_features: int, in_features: int, dtype: torch.dtype, backend: str | None = None) -> bool:
    """Whether the backend's minimum-block constraints accept a weight of this shape."""
    name = backend or default_backend()
    cls = (torch.sparse.SparseSemiStructuredTensorCUTLASS if name == "cutlass"
           else torch.sparse.SparseSemiStructuredTensorCUSPARSELT)
    c = cls._DTYPE_SHAPE_CONSTRAINTS.get(dtype)
    return c is not None and out_features % c.sparse_min_rows == 0 and in_features % c.sparse_min_cols == 0 \
        and out_features >= c.sparse_min_rows and in_features >= c.sparse_min_cols


class SemiStructuredLinear(nn.Module):
    """``y = x·Wᵀ + b (+ side(x))`` with ``W`` a semi-structured sparse tensor (inference only)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, side: nn.Module | None = None,
                 backend: str | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.backend = backend or default_backend()
        self.weight = nn.Parameter(semi_structured_weight(weight, self.backend), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.side = side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.reshape(-1, self.in_features).contiguous(), self.weight, self.bias)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.side is None else y + self.side(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, backend={self.backend}"


def to_semi_structured(model: nn.Module, dtype: torch.dtype = torch.bfloat16,
                       backend: str | None = None) -> dict[str, list[str]]:
    """Swap every ``SparseLinear`` (in place) for a :class:`SemiStructuredLinear` on CUDA.

    The model is first moved to CUDA in ``dtype`` (bf16/fp16: the sparse tensor
    cores' types). Layers whose shape the backend refuses stay dense-masked
    ``SparseLinear`` and are listed under ``"skipped"``. A layer whose effective
    weight is not 2:4 is an error (the kernel would silently prune it).
    """
    require_cuda()
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"semi-structured kernels take bf16/fp16 here, got {dtype}")
    model.to(device="cuda", dtype=dtype)
    converted, skipped = [], []
    for name, layer in list(sparse_layers(model)):
        if not shape_supported(layer.out_features, layer.in_features, dtype, backend):
            skipped.append(name)
            continue
        w = layer.effective_weight()
        bad = violations(w, 2, 4)
        if bad:
            raise ValueError(f"{name}: effective weight is not 2:4 ({bad} groups hold more than 2 non-zeros)")
        new = SemiStructuredLinear(w, layer.bias, layer.side, backend)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        converted.append(name)
    return {"converted": converted, "skipped": skipped}


@torch.no_grad()
def compare_outputs(dense_masked_model: nn.Module, sparse_model: nn.Module,
                    input_ids: torch.Tensor) -> dict[str, float]:
    """Max abs / relative difference of logits: ``max|a−b|`` and ``max|a−b| / max|a|``."""
    a = dense_masked_model(input_ids).logits.float()
    b = sparse_model(input_ids.to(next(sparse_model.parameters()).device)).logits.float().to(a.device)
    diff = (a - b).abs()
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
            "max_rel": float(diff.max() / a.abs().max().clamp_min(1e-30))}


def _time_ms(fn, iters: int, inner: int, warmup: int, graph: bool = False) -> float:  # type: ignore[no-untyped-def]
    """Median over ``iters`` samples of (CUDA-event time of ``inner`` calls) / inner.

    ``graph=True`` captures the ``inner`` calls once in a CUDA graph and times
    its replay: the kernels alone, without the per-call host work (dispatch,
    cuSPARSELt plan set-up) that eager timing includes. A served model replays
    graphs, so both numbers matter.
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    calls = [fn] * inner
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(inner):
                fn()
        calls = [g.replay]
        g.replay()
        torch.cuda.synchronize()
    samples = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for call in calls:
            call()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / inner)
    return statistics.median(samples)


def _graph_ms(fn, iters: int, inner: int, warmup: int) -> float | None:  # type: ignore[no-untyped-def]
    """:func:`_time_ms` with ``graph=True``, or ``None`` when the call cannot be captured."""
    try:
        return _time_ms(fn, iters, inner, warmup, graph=True)
    except RuntimeError:
        torch.cuda.synchronize()
        return None


def speed_table(shapes: list[tuple[int, int]], tokens: list[int], dtype: torch.dtype = torch.bfloat16,
                iters: int = 50, inner: int = 10, warmup: int = 10, backend: str | None = None,
                seed: int = 0, graphs: bool = False) -> list[dict]:
    """Time dense ``F.linear`` against the 2:4 semi-structured kernel per (out, in) × tokens.

    The weight is random, pruned 2:4 by magnitude; dense runs on ``W ⊙ m`` so
    both compute the same product. Each row also checks the sparse result
    against the dense one (``rel_err`` = max|Δ| / max|dense|; ``ok`` when
    below 1e-2, bf16 round-off with fp32 accumulation in both). ``graphs``
    adds CUDA-graph replay times (``*_graph_ms``; ``None`` where capture fails).
    """
    require_cuda()
    gen = torch.Generator(device="cuda").manual_seed(seed)
    rows = []
    name = backend or default_backend()
    for out_f, in_f in shapes:
        w = torch.randn(out_f, in_f, device="cuda", dtype=dtype, generator=gen)
        w = w * nm_mask(magnitude_score(w)).to(dtype)
        ws = semi_structured_weight(w, name)
        for t in tokens:
            x = torch.randn(t, in_f, device="cuda", dtype=dtype, generator=gen)
            with torch.no_grad():
                ref, got = F.linear(x, w), F.linear(x, ws)
                dense_ms = _time_ms(lambda: F.linear(x, w), iters, inner, warmup)
                sparse_ms = _time_ms(lambda: F.linear(x, ws), iters, inner, warmup)
                dense_g = _graph_ms(lambda: F.linear(x, w), iters, inner, warmup) if graphs else None
                sparse_g = _graph_ms(lambda: F.linear(x, ws), iters, inner, warmup) if graphs else None
            err = float((ref.float() - got.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))
            flops = 2.0 * t * out_f * in_f
            rows.append({"out": out_f, "in": in_f, "tokens": t, "dtype": str(dtype).removeprefix("torch."),
                         "backend": name, "dense_ms": dense_ms, "sparse_ms": sparse_ms,
                         "speedup": dense_ms / sparse_ms, "dense_tflops": flops / dense_ms / 1e9,
                         "dense_graph_ms": dense_g, "sparse_graph_ms": sparse_g,
                         "graph_speedup": dense_g / sparse_g if dense_g and sparse_g else None,
                         "rel_err": err, "ok": err < 1e-2})
    return rows


def speed_table_markdown(rows: list[dict]) -> str:
    """A markdown table of :func:`speed_table` rows; speed-ups below 1 are marked as slower."""
    graphs = any(r.get("graph_speedup") is not None for r in rows)
    head = "| out × in | tokens | dense ms | 2:4 ms | speed-up |"
    rule = "|---|---:|---:|---:|---:|"
    if graphs:
        head += " dense ms (graph) | 2:4 ms (graph) | speed-up (graph) |"
        rule += "---:|---:|---:|"
    lines = [head + " rel err |", rule + "---:|"]

    def _x(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2f}×" + ("" if v >= 1 else " (slower)")

    for r in rows:
        line = f"| {r['out']} × {r['in']} | {r['tokens']} | {r['dense_ms']:.4f} | {r['sparse_ms']:.4f} | " \
               f"{_x(r['speedup'])} |"
        if graphs:
            dg, sg = r.get("dense_graph_ms"), r.get("sparse_graph_ms")
            line += f" {'n/a' if dg is None else f'{dg:.4f}'} | {'n/a' if sg is None else f'{sg:.4f}'} | " \
                    f"{_x(r.get('graph_speedup'))} |"
        lines.append(line + f" {r['rel_err']:.1e}{'' if r['ok'] else ' FAIL'} |")
    return "\n".join(lines) + "\n"


def kernel_report(model: nn.Module, tokens: list[int], out_dir: str | Path, dtype: torch.dtype = torch.bfloat16,
                  iters: int = 30, backend: str | None = None, seed: int = 0) -> dict:
    """The compile stage's CUDA check: speed table over the model's own layer shapes + logit agreement.

    Leaves ``model`` untouched: a copy on CUDA in ``dtype`` is the dense-masked
    reference (``SparseLinear``, SLoRB included) and a second copy gets the 2:4
    kernels. Writes ``speed_table.json`` / ``speed_table.md`` under ``out_dir``.
    """
    require_cuda()
    shapes = sorted({(layer.out_features, layer.in_features) for _, layer in sparse_layers(model)})
    if not shapes:
        raise ValueError(f"{type(model).__name__} has no SparseLinear layers: nothing to accelerate")
    rows = speed_table(shapes, tokens, dtype, iters=iters, backend=backend, seed=seed)
    reference = copy.deepcopy(model).to(device="cuda", dtype=dtype).eval()
    sparse = copy.deepcopy(reference)
    layers = to_semi_structured(sparse, dtype, backend)
    vocab = getattr(getattr(model, "config", None), "vocab_size", 1000)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 64), device="cuda", generator=gen)
    diff = compare_outputs(reference, sparse, ids)
    del reference, sparse
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name(), "backend": backend or default_backend(),
              "dtype": str(dtype).removeprefix("torch."), "converted": len(layers["converted"]),
              "skipped": layers["skipped"], "logit_diff": diff, "rows": rows}
    (out / "speed_table.json").write_text(json.dumps(report, indent=2))
    (out / "speed_table.md").write_text(speed_table_markdown(rows))
    return report
