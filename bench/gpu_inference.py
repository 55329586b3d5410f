"""What a 2:4 model buys at inference, end to end: prefill and decode, dense vs 2:4 kernels, bf16.

    python -m bench.gpu_inference [--models llama2-7b smollm2-135m] [--out-dir OUT]   # a CUDA GPU
    python -m bench.gpu_inference --dry-run                                            # the plan, anywhere
    python -m bench.gpu_inference --device cpu --models tiny                           # the code paths (tests)

Models are LLaMA-architecture ``transformers`` models with **random weights** in the
shapes of LLaMA-2-7B and SmolLM2-135M (speed depends on shapes, not values; the numbers
say nothing about quality). Every linear layer of the decoder blocks gets a 2:4
magnitude mask (:mod:`ast_core.sparse`, :mod:`ast_core.masks`); embeddings, norms and
the LM head stay dense, as in the project's compile stage.

Variants, each built from the same masked model:

- ``dense``: plain ``nn.Linear`` holding ``W ⊙ m`` (the fair baseline: same values, dense kernels);
- ``2:4-cusparselt`` / ``2:4-cutlass``: :func:`ast_core.kernels.to_semi_structured` with that backend;
- ``2:4-cusparselt+slorb``: the same plus the SLoRB side branch (:mod:`ast_core.slorb`, group 16);
- ``torchao-fp8-2:4``: torchao's FP8 activation × FP8 2:4 weight path (Hopper), only if a
  torchao wheel imports and runs on this torch; otherwise the result says why.

Measured (CUDA events; medians): prefill tokens/s at batch 1 for each prompt length (one
forward, last-position logits only, no cache kept) and decode tokens/s at each batch
size (one new token per sequence per step against a static KV cache of ``--context``
tokens), each eager and replayed from a CUDA graph where capture works; the peak memory
of each variant. Decode reads every weight once per step, so when memory-bound its
speed-up is bounded by the bytes ratio: 2:4 values + metadata are 0.5625× the dense
bf16 bytes of a linear layer (≤ 1.78×), less for the whole model, whose embeddings, LM
head and KV cache stay dense; the report prints that bound per model next to the measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from ast_core.models import RANDOM_CONFIGS, TINY_CONFIGS

# LLaMA-2-7B's published shape (config.json of meta-llama/Llama-2-7b-hf), random weights here
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                 tie_word_embeddings=False)
MODELS: dict[str, dict] = {
    "llama2-7b": LLAMA2_7B,
    "smollm2-135m": RANDOM_CONFIGS["smollm2-135m"],
    "tiny": {**{k: v for k, v in TINY_CONFIGS["llama"].items() if k != "model_type"}, "vocab_size": 1024},
}
VARIANTS = ("dense", "2:4-cusparselt", "2:4-cutlass", "2:4-cusparselt+slorb", "torchao-fp8-2:4")
SPARSE_BYTES_RATIO = 0.5625  # 2:4 bf16: half the values + 2-bit indices per kept value (1/16 of the dense bytes)
SLORB_GROUP = 16


# ----------------------------------------------------------------------------- plan (no GPU needed)

def param_counts(cfg: dict) -> dict[str, int]:
    """Parameters in the decoder blocks' linear layers (the 2:4 part) and elsewhere."""
    h, i, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    hd = h // heads
    linear = n * (h * heads * hd + 2 * h * kv * hd + heads * hd * h + 3 * h * i)
    emb = cfg["vocab_size"] * h
    head = 0 if cfg.get("tie_word_embeddings") else emb
    norms = n * 2 * h + h
    return {"linear": linear, "embedding": emb, "lm_head": head, "norms": norms,
            "total": linear + emb + head + norms}


def decode_bound(cfg: dict, batch: int, context: int, slorb: bool = False) -> dict[str, float]:
    """Memory-bound speed-up limit of one decode step: dense bytes read / 2:4 bytes read.

    Per step every linear weight is read once (bf16: 2 bytes; 2:4: 0.5625 × that), plus
    the dense parts: the LM head (the embedding is a gather of ``batch`` rows, negligible)
    and the KV cache of ``batch × context`` tokens. SLoRB adds its S matrices (out × in/16).
    """
    p = param_counts(cfg)
    h, n = cfg["hidden_size"], cfg["num_hidden_layers"]
    kv = cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * (h // cfg["num_attention_heads"])
    kv_bytes = 2 * n * kv * 2 * batch * context  # K and V, bf16
    head_bytes = 2 * cfg["vocab_size"] * h
    dense = 2 * p["linear"] + head_bytes + kv_bytes
    sparse = SPARSE_BYTES_RATIO * 2 * p["linear"] + head_bytes + kv_bytes + (2 * p["linear"] / SLORB_GROUP if slorb
                                                                           else 0)
    return {"dense_bytes": dense, "sparse_bytes": sparse, "bound": dense / sparse,
            "linear_only_bound": 1 / SPARSE_BYTES_RATIO}


def plan(args: argparse.Namespace) -> dict[str, Any]:
    models = {}
    for name in args.models:
        cfg = MODELS[name]
        p = param_counts(cfg)
        models[name] = {
            "config": cfg, "params": p, "dense_bf16_gib": 2 * p["total"] / 2**30,
            "prefill_prompts": [L for L in args.prompts if L <= cfg["max_position_embeddings"]],
            "decode": [{"batch": b, "context": args.context, **decode_bound(cfg, b, args.context)}
                       for b in args.batches],
        }
    return {"models": models, "variants": args.variants, "decode_steps": args.decode_steps,
            "iters": args.iters, "graphs": args.graphs, "weights": "random (speed depends on shapes only)"}


def print_plan(p: dict[str, Any]) -> None:
    print(f"variants: {', '.join(p['variants'])}; weights: {p['weights']}; CUDA graphs: {p['graphs']}")
    for name, m in p["models"].items():
        pc = m["params"]
        print(f"{name}: {pc['total'] / 1e6:,.1f}M parameters ({pc['linear'] / pc['total']:.0%} in 2:4 linear "
              f"layers), dense bf16 {m['dense_bf16_gib']:.2f} GiB; prefill at {m['prefill_prompts']} tokens")
        for d in m["decode"]:
            print(f"  decode batch {d['batch']:>3} @ {d['context']} context: memory-bound limit "
                  f"{d['bound']:.2f}× (linear layers alone {d['linear_only_bound']:.2f}×)")


# ----------------------------------------------------------------------------- building the variants

def build_masked(name: str, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """A random-weight LLaMA of ``name``'s shape in bf16 on ``device``, its block linears 2:4-masked."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ast_core.masks import magnitude_score, nm_mask
    from ast_core.sparse import sparse_layers, sparsify

    cfg = AutoConfig.for_model("llama", **MODELS[name])
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.eval().requires_grad_(False)
    sparsify(model, 2, 4, [r"lm_head"])
    for _, layer in sparse_layers(model):
        layer.set_mask(nm_mask(magnitude_score(layer.weight), 2, 4))
    return model


def make_variant(masked: torch.nn.Module, variant: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A copy of ``masked`` as ``variant`` (see the module docstring)."""
    from ast_core.sparse import densify

    model = copy.deepcopy(masked)
    info: dict[str, Any] = {}
    if variant == "dense":
        densify(model)  # nn.Linear holding W ⊙ m
        return model, info
    if variant.startswith("2:4-"):
        from ast_core.kernels import to_semi_structured
        backend = variant.removeprefix("2:4-").split("+")[0]
        if variant.endswith("+slorb"):
            from ast_core.slorb import add_slorb
            info["slorb_params"] = add_slorb(model, SLORB_GROUP, False, None)
        conv = to_semi_structured(model, torch.bfloat16, backend)
        info.update(converted=len(conv["converted"]), skipped=conv["skipped"])
        return model, info
    if variant == "torchao-fp8-2:4":
        densify(model)
        info.update(torchao_fp8_sparse(model))
        return model, info
    raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")


def torchao_fp8_sparse(model: torch.nn.Module) -> dict[str, Any]:
    """torchao's FP8 (dynamic activation) × FP8 2:4 (weight) linears on the decoder blocks, in place."""
    import torchao  # raises ImportError where no wheel was brought
    from torchao.quantization import quantize_
    cls = None
    for where in ("torchao.quantization", "torchao.sparsity", "torchao.quantization.quant_api"):
        with contextlib.suppress(ImportError):
            mod = __import__(where, fromlist=["Float8DynamicActivationFloat8SemiSparseWeightConfig"])
            cls = getattr(mod, "Float8DynamicActivationFloat8SemiSparseWeightConfig", None)
        if cls is not None:
            break
    if cls is None:
        raise ImportError(f"torchao {torchao.__version__} has no Float8DynamicActivationFloat8SemiSparseWeightConfig")

    def blocks_only(mod: torch.nn.Module, fqn: str) -> bool:
        return isinstance(mod, torch.nn.Linear) and ".layers." in f".{fqn}"

    quantize_(model, cls(), filter_fn=blocks_only)
    return {"torchao": torchao.__version__, "config": cls.__name__}


# ----------------------------------------------------------------------------- timing

class Timer:
    """Median milliseconds of ``fn`` (CUDA events on a GPU, perf_counter on CPU), optionally graph-replayed."""

    def __init__(self, device: torch.device, iters: int, warmup: int) -> None:
        self.device, self.iters, self.warmup = device, iters, warmup

    def __call__(self, fn: Callable[[], Any], graph: bool = False) -> float:
        if self.device.type != "cuda":
            for _ in range(self.warmup):
                fn()
            samples = []
            for _ in range(self.iters):
                t = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t) * 1e3)
            return statistics.median(samples)
        from ast_core.kernels import _time_ms
        return _time_ms(fn, self.iters, 1, self.warmup, graph=graph)


def _cache_kw(model: torch.nn.Module) -> str:
    """The forward's name for the KV cache: ``cache`` (newer transformers) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _static_cache(model: torch.nn.Module, batch: int, max_len: int, device: torch.device):  # type: ignore[no-untyped-def]
    from transformers import StaticCache
    try:
        return StaticCache(config=model.config, max_cache_len=max_len)
    except TypeError:  # older signatures want the batch, device and dtype up front
        return StaticCache(config=model.config, max_batch_size=batch, max_cache_len=max_len, device=device,
                           dtype=torch.bfloat16)


@torch.no_grad()
def prefill(model: torch.nn.Module, prompt: int, timer: Timer, graphs: bool, seed: int = 0) -> dict[str, Any]:
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), device=device, generator=gen)

    def fwd() -> None:
        model(input_ids=ids, use_cache=False, logits_to_keep=1)

    row: dict[str, Any] = {"prompt": prompt, "eager_ms": timer(fwd)}
    row["eager_tok_s"] = prompt / row["eager_ms"] * 1e3
    if graphs:
        row.update(_graph_or_error(lambda: timer(fwd, graph=True), prompt))
    return row


def _graph_or_error(measure: Callable[[], float], tokens: int) -> dict[str, Any]:
    try:
        ms = measure()
        return {"graph_ms": ms, "graph_tok_s": tokens / ms * 1e3}
    except Exception as err:  # noqa: BLE001 — a capture failure is a result, not a crash
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return {"graph_ms": None, "graph_error": f"{type(err).__name__}: {err}"[:300]}


@torch.no_grad()
def decode(model: torch.nn.Module, batch: int, context: int, steps: int, timer: Timer, graphs: bool,
           seed: int = 0) -> dict[str, Any]:
    """Per-step time of one new token for each of ``batch`` sequences at ``context`` cached tokens."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    kw = _cache_kw(model)
    cache = _static_cache(model, batch, context + steps + timer.warmup + timer.iters + 8, device)
    prompt = torch.randint(0, model.config.vocab_size, (batch, context), device=device, generator=gen)
    model(input_ids=prompt, cache_position=torch.arange(context, device=device), use_cache=True,
          logits_to_keep=1, **{kw: cache})
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device=device, generator=gen)
    pos = torch.full((1,), context, dtype=torch.long, device=device)

    def step() -> None:  # the position stays fixed: same work every call, graph-safe (no host sync)
        model(input_ids=ids, cache_position=pos, use_cache=True, **{kw: cache})

    row: dict[str, Any] = {"batch": batch, "context": context, "eager_ms": timer(step)}
    row["eager_tok_s"] = batch / row["eager_ms"] * 1e3
    if graphs:
        row.update(_graph_or_error(lambda: timer(step, graph=True), batch))
    return row  # the static cache goes with this frame (and with ``step``, the one closure holding it)


# ----------------------------------------------------------------------------- the run

def _row(key: str, value: int, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """One prefill/decode row, or the error that stopped it (the other rows still run)."""
    try:
        return measure()
    except Exception as err:  # noqa: BLE001
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return {key: value, "error": f"{type(err).__name__}: {err}"[:300]}


def _mem_gib() -> float:
    return torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def run_model(name: str, args: argparse.Namespace, device: torch.device, log: Callable[[str], None]) -> dict:
    t = time.perf_counter()
    masked = build_masked(name, device, args.seed)
    base = _mem_gib()
    out: dict[str, Any] = {"model": name, "weights": "random", "build_s": time.perf_counter() - t,
                           "params": param_counts(MODELS[name]), "variants": {}}
    log(f"{name}: built and masked in {out['build_s']:.1f} s ({base:.2f} GiB with masks)")
    timer = Timer(device, args.iters, args.warmup)
    for variant in args.variants:
        res: dict[str, Any] = {}
        out["variants"][variant] = res
        t = time.perf_counter()
        if device.type != "cuda" and variant != "dense":
            res["skipped"] = "needs a CUDA GPU (semi-structured kernels / FP8)"
            continue
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            before = _mem_gib()
            model, info = make_variant(masked, variant)
            res.update(info, weights_gib=_mem_gib() - before)
            graphs = args.graphs and device.type == "cuda"
            res["prefill"] = [_row("prompt", L, lambda L=L: prefill(model, L, timer, graphs))
                              for L in args.prompts if L <= model.config.max_position_embeddings]
            res["decode"] = [_row("batch", b, lambda b=b: decode(model, b, args.context, args.decode_steps, timer,
                                                                 graphs)) for b in args.batches]
            if device.type == "cuda":
                res["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 - before
            model = None  # frees the variant's weights before the next one is built (not `del`: the
            # lambdas above close over the name)
        except Exception as err:  # noqa: BLE001 — one variant failing must not cost the others
            res["error"] = f"{type(err).__name__}: {err}"[:500]
            res["traceback"] = traceback.format_exc()[-2000:]
        finally:
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
        res["wall_s"] = time.perf_counter() - t
        log(f"  {variant}: " + (res.get("error") or res.get("skipped") or f"{res['wall_s']:.1f} s"))
    del masked
    out["decode_bounds"] = {b: decode_bound(MODELS[name], b, args.context) for b in args.batches}
    return out


def _speedups(result: dict) -> None:
    """Each variant's ratio to dense, eager and graph, in place."""
    dense = result["variants"].get("dense", {})
    for kind, key in (("prefill", "prompt"), ("decode", "batch")):
        ref = {r[key]: r for r in dense.get(kind, []) if "error" not in r}
        for v in result["variants"].values():
            for r in v.get(kind, []):
                d = ref.get(r[key])
                if d is None or "error" in r:
                    continue
                r["speedup_eager"] = d["eager_ms"] / r["eager_ms"]
                if r.get("graph_ms") and d.get("graph_ms"):
                    r["speedup_graph"] = d["graph_ms"] / r["graph_ms"]


def _f(v: float | None, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def render(report: dict) -> str:
    lines = [f"## 2:4 inference end to end ({report['device']})", "",
             f"torch {report['torch']}, CUDA {report['cuda']}, bf16; **random weights** in each model's shapes "
             "(speed only); medians of CUDA-event times; eager and CUDA-graph replay. Speed-ups are against "
             "`dense` (the same 2:4-masked values in plain bf16 linears).", ""]
    for m in report["results"]:
        lines += [f"### {m['model']} ({m['params']['total'] / 1e6:,.0f}M parameters, "
                  f"{m['params']['linear'] / m['params']['total']:.0%} in 2:4 layers)", ""]
        for v, r in m["variants"].items():
            if "error" in r or "skipped" in r:
                lines.append(f"- {v}: not measured — {r.get('error') or r.get('skipped')}")
        lines += ["", "Prefill, batch 1 (tokens/s; speed-up vs dense):", "",
                  "| variant | prompt | eager tok/s | × | graph tok/s | × |", "|---|---:|---:|---:|---:|---:|"]
        for v, r in m["variants"].items():
            for p in r.get("prefill", []):
                if "error" in p:
                    lines.append(f"| {v} | {p['prompt']} | error: {p['error'][:80]} | | | |")
                    continue
                lines.append(f"| {v} | {p['prompt']} | {p['eager_tok_s']:,.0f} | {_f(p.get('speedup_eager'), '.2f')} | "
                             f"{_f(p.get('graph_tok_s'), ',.0f')} | {_f(p.get('speedup_graph'), '.2f')} |")
        lines += ["", f"Decode, one token per sequence per step at {report['context']} cached tokens "
                  "(tokens/s; speed-up vs dense; the memory-bound limit from bytes read per step):", "",
                  "| variant | batch | eager tok/s | × | graph tok/s | × | limit | peak GiB |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for v, r in m["variants"].items():
            for d in r.get("decode", []):
                if "error" in d:
                    lines.append(f"| {v} | {d['batch']} | error: {d['error'][:80]} | | | | | |")
                    continue
                bound = m["decode_bounds"][d["batch"]]["bound"]
                lines.append(f"| {v} | {d['batch']} | {d['eager_tok_s']:,.0f} | {_f(d.get('speedup_eager'), '.2f')} | "
                             f"{_f(d.get('graph_tok_s'), ',.0f')} | {_f(d.get('speedup_graph'), '.2f')} | "
                             f"{bound:.2f}× | {_f(r.get('peak_gib'), '.2f')} |")
        slower = [f"{v} {k} {r2.get('prompt') or r2.get('batch')}"
                  for v, r in m["variants"].items() if v != "dense"
                  for k in ("prefill", "decode") for r2 in r.get(k, [])
                  if (r2.get("speedup_graph") or r2.get("speedup_eager") or 1) < 1]
        lines += ["", "Slower than dense (graph where captured, else eager): "
                  + (", ".join(slower) if slower else "none"), ""]
    if report.get("torchao"):
        lines += [f"torchao: {report['torchao']}", ""]
    lines += [f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def torchao_status() -> str:
    try:
        import torchao
        return f"torchao {torchao.__version__} imported"
    except Exception as err:  # noqa: BLE001
        return f"not available: {type(err).__name__}: {err}"[:300]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_inference", description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "llama2-7b"], choices=list(MODELS))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--prompts", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--context", type=int, default=512, help="cached tokens per sequence during decode")
    ap.add_argument("--decode-steps", type=int, default=32, help="room in the static cache beyond the context")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-graphs", dest="graphs", action="store_false", help="eager timings only")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dry-run", action="store_true", help="print the plan and the memory-bound limits; no model")
    ap.add_argument("--out-dir", default=None)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    p = plan(args)
    print_plan(p)
    out = Path(args.out_dir) if args.out_dir else None
    if args.dry_run:
        if out:
            out.mkdir(parents=True, exist_ok=True)
            (out / "gpu_inference_plan.json").write_text(json.dumps(p, indent=2) + "\n")
        return 0
    device = torch.device(args.device)
    if device.type == "cuda":
        from ast_core.kernels import cuda_available
        ok, reason = cuda_available()
        if not ok:
            print(f"no CUDA: skipped\n  {reason}")
            return 2
    t0 = time.perf_counter()
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.machine()})",
        "torch": torch.__version__, "cuda": torch.version.cuda, "context": args.context, "plan": p,
        "torchao": torchao_status() if "torchao-fp8-2:4" in args.variants else None,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu_cores": os.cpu_count(),
        "command": "python -m bench.gpu_inference " + " ".join(sys.argv[1:]), "results": []}

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f} s] {msg}", flush=True)

    def write() -> None:
        report["wall_s"] = time.perf_counter() - t0
        if out:
            out.mkdir(parents=True, exist_ok=True)
            (out / "gpu_inference.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
            (out / "gpu_inference.md").write_text(render(report))

    for name in args.models:
        r = run_model(name, args, device, log)
        _speedups(r)
        report["results"].append(r)
        write()
    print(render(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
