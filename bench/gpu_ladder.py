"""The fair ladder's decisive rungs at a GPU budget, on the real SmolLM2-135M, in one prepared run.

Two steps, on two machines:

    # here (CPU, once): tokenize the C4 sample and WikiText-2 test into uint16 .npy (a few MB)
    python -m bench.gpu_ladder prepare [--out .device/data] [--sources c4 c4-realnewslike] [--seq-len 512]

    # on the GPU machine (docs/GPU.md; scripts/device/run_gpu.sh calls it)
    python -m bench.gpu_ladder run --data .device/data --device cuda --seconds-per-rung 75 --out-dir OUT

Rungs (their settings are :func:`bench.fair_ladder.rung_overrides`, applied to the same
params preset): ``fixed-kd-u2`` (fixed mask + the same KD and the same u² optimizer: the control), ``ast-paper``
(magnitude refresh, v tracks u², λ_max = 1e-4·40000/steps, T0 25%), ``ast-official`` (Wanda-scored
refresh, the same u² optimizer and λ: the best AST setting on the CPU ladder's C4 validation at 20k
tokens), and ``oneshot-sparsegpt`` plus ``dense`` as references.

Fairness: every trained rung starts from one initial Wanda mask (computed once, set on
every student, checked bit for bit), reads the same blocks in the same order (one
seed), takes the same number of steps and tokens and learns from the same online
teacher (the dense model, bf16 weights, on the same device). The step budget is
computed once from a short timing warm-up (``--seconds-per-rung``; ``--steps``
overrides it), the same for every rung; several epochs over the C4 sample when the
budget exceeds it (the JSON says how many).

Precision: ``--precision autocast`` (default) trains with fp32 master weights under
``torch.autocast(bfloat16)``; the teacher holds bf16 weights. Every perplexity is
computed in float32 (as on CPU), WikiText-2 test on the whole split by default
(``--windows all``) with a 95% bootstrap interval and the paired ratio to fixed-kd.

Outputs under ``--out-dir``: ``gpu_ladder.json`` and ``gpu_ladder.md`` (the table shape
of :mod:`bench.fair_ladder`: ppl, tokens, tokens/s, cumulative mask change, C4
validation ppl-vs-tokens curve), rewritten after every rung so a run cut short still
reports what it finished. Runs on CPU with ``--device cpu --model tiny:llama`` (tests).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ast_core.atomic import atomic_write_text
from ast_core.integrity import sha256_file
from ast_core.perplexity import perplexity  # noqa: E402
from ast_core.recipe import prepare_student  # noqa: E402
from ast_core.refresh import snapshot_masks  # noqa: E402
from ast_core.sparse import sparse_layers  # noqa: E402
from ast_core.train import OnlineTeacher, train  # noqa: E402
from bench.fair_ladder import rung_overrides, summarize, table, verdicts  # noqa: E402
from bench.ladder import resolve_params  # noqa: E402
from bench.runner import stamp, write_json  # noqa: E402
from tasks.config import PipelineConfig, load_config  # noqa: E402
from tasks.train import recipe_of  # noqa: E402

TRAINED = ("fixed-kd-u2", "ast-paper", "ast-official")  # every AST rung here tracks u²: its control is fixed-kd-u2
DATA_FILES = ("train", "val", "calib", "wikitext2_test")
TARGET_TOKENS = 10_000_000


# ----------------------------------------------------------------------------- data (here, once)

def write_data(out: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> dict[str, Any]:
    """Save the four arrays as .npy plus ``manifest.json`` (shapes, dtypes, sha256 of every file)."""
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name in DATA_FILES:
        path = out / f"{name}.npy"
        np.save(path, arrays[name])
        files[name] = {"file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size,
                       "shape": list(arrays[name].shape), "dtype": str(arrays[name].dtype)}
    manifest = {**meta, "files": files}
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def load_data(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays :func:`write_data` saved, each checked against the manifest's sha256."""
    manifest = json.loads((path / "manifest.json").read_text())
    arrays = {}
    for name in DATA_FILES:
        entry = manifest["files"][name]
        f = path / entry["file"]
        got = sha256_file(f)
        if got != entry["sha256"]:
            raise SystemExit(f"{f}: sha256 {got} != manifest {entry['sha256']} (re-run `prepare` here)")
        arrays[name] = np.load(f)
    return arrays, manifest


def prepare(args: argparse.Namespace) -> int:
    """C4 sample (+ WikiText-2 test) → token blocks, split as the pipeline's prepare stage splits them."""
    from ast_core.data import describe_source, load_texts, split_blocks, tokenize_blocks, wikitext2_eval_text
    from ast_core.models import load_tokenizer, tokenizer_fingerprint

    tok = load_tokenizer(args.model)
    texts, sources = [], []
    for src in args.sources:
        docs = load_texts(src, "train", max_docs=args.max_docs)
        texts += docs
        sources.append({**describe_source(src, "train"), "documents": len(docs)})
    blocks = tokenize_blocks(texts, tok, args.seq_len)
    train_b, val_b, calib_b = split_blocks(blocks, n_val=args.val_blocks, calib_n=args.calib_blocks, seed=args.seed)
    wiki = tok(wikitext2_eval_text("test"), return_tensors="np", verbose=False)["input_ids"][0]
    if args.max_wiki_tokens:
        wiki = wiki[: args.max_wiki_tokens]
    wiki = wiki.astype(blocks.dtype)
    meta = {"sources": sources, "seq_len": args.seq_len, "seed": args.seed,
            "tokenizer": {"spec": args.model, "fingerprint": tokenizer_fingerprint(tok), "vocab": len(tok)},
            "counts": {"documents": len(texts), "train_blocks": int(len(train_b)), "val_blocks": int(len(val_b)),
                       "calib_blocks": int(len(calib_b)), "train_tokens": int(train_b.size),
                       "wikitext2_test_tokens": int(wiki.size)},
            "wikitext2": "the test split, tokenizer(\"\\n\\n\".join(rows)) as ast_core.perplexity does"
                         + (f", cut to {args.max_wiki_tokens} tokens" if args.max_wiki_tokens else "")}
    m = write_data(Path(args.out), {"train": train_b, "val": val_b, "calib": calib_b, "wikitext2_test": wiki}, meta)
    size = sum(f["bytes"] for f in m["files"].values())
    print(f"wrote {args.out}: {m['counts']['train_tokens']:,} training tokens in {len(train_b)} blocks of "
          f"{args.seq_len}, {len(val_b)} val, {len(calib_b)} calib, {wiki.size:,} WikiText-2 test tokens "
          f"({size / 2**20:.1f} MiB)")
    return 0


# ----------------------------------------------------------------------------- the run (GPU)

def rung_config(params: str, rung: str, steps: int, args: argparse.Namespace, seq_len: int,
                extra: tuple[str, ...] = ()) -> PipelineConfig:
    """The preset + this run's shared budget + the rung's own settings (fair_ladder.rung_overrides)."""
    pre = load_config(params, args.overrides)
    base = [f"seed={args.seed}", f"model.student={args.model}", f"data.seq_len={seq_len}",
            f"train.steps={steps}", f"train.batch_size={args.batch}", "train.grad_accum=1",
            f"train.eval_every={max(1, steps // args.curve_points)}", f"train.checkpoint_every={steps}",
            f"train.log_every={max(1, steps // 50)}",
            f"train.t0_steps={max(1, steps // 2)}"]  # the preset's share; AST rungs set their own
    if pre.train.warmup_steps > steps:
        base.append(f"train.warmup_steps={steps}")
    return load_config(params, [*base, *args.overrides, *rung_overrides(rung, steps), *extra])


def _calib(arrays: dict[str, np.ndarray], batch: int = 8) -> list[torch.Tensor]:
    calib = arrays["calib"]
    return [torch.from_numpy(calib[i:i + batch].astype(np.int64)) for i in range(0, len(calib), batch)]


def _autocast(device: torch.device, precision: str):  # type: ignore[no-untyped-def]
    if precision == "autocast":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


class Ladder:
    """The shared state of one run: data, dense weights, teacher, initial mask, evaluation windows."""

    def __init__(self, args: argparse.Namespace) -> None:
        from ast_core.models import load_model

        self.args = args
        self.device = torch.device(args.device)
        self.params = resolve_params(args.params)
        self.arrays, self.manifest = load_data(Path(args.data))
        self.seq_len = int(self.arrays["train"].shape[1])
        t = time.perf_counter()
        self.dense = load_model(args.model, dtype=torch.float32, seed=args.seed)  # fp32 master copy, CPU
        vocab = self.dense.config.vocab_size
        if int(self.arrays["train"].max()) >= vocab or int(self.arrays["wikitext2_test"].max()) >= vocab:
            raise SystemExit(f"token ids exceed the model's vocabulary of {vocab}: data and model do not match")
        tdtype = torch.float32 if args.precision == "fp32" else torch.bfloat16
        self.teacher = OnlineTeacher(copy.deepcopy(self.dense).to(self.device, tdtype))
        self.load_s = time.perf_counter() - t
        self.eval_seq_len = load_config(self.params, args.overrides).evaluate.seq_len
        self.initial_masks: dict[str, torch.Tensor] | None = None

    def student(self, cfg: PipelineConfig):  # type: ignore[no-untyped-def]
        """A fresh student for ``cfg``'s method on the device, with the run's one initial mask."""
        model = copy.deepcopy(self.dense).to(self.device)
        st = prepare_student(model, recipe_of(cfg), lambda: _calib(self.arrays))
        if cfg.train.spec.sparse and not cfg.train.spec.oneshot:
            if self.initial_masks is None:
                self.initial_masks = {k: v.cpu() for k, v in snapshot_masks(st.model).items()}
            differ = 0
            for name, layer in sparse_layers(st.model):
                ref = self.initial_masks[name].to(layer.mask.device)
                differ += int((layer.mask != ref).sum())
                layer.set_mask(ref)
            st.info["initial_mask_bits_recomputed_differently"] = differ  # 0: Wanda reproduced exactly
        return st

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, Any]:
        """WikiText-2 test perplexity in float32 over ``--windows`` windows (all: the whole split)."""
        model.float()
        t = time.perf_counter()
        r = perplexity(model, torch.from_numpy(self.arrays["wikitext2_test"].astype(np.int64)), self.eval_seq_len,
                       max_windows=self.args.windows, batch_size=self.args.eval_batch)
        _sync(self.device)
        return {"ppl_wikitext2": r.ppl, "ppl_wikitext2_ci95": list(r.interval) if r.interval else None,
                "ppl_window_nll": list(r.window_nll), "ppl_windows": r.windows, "ppl_seq_len": self.eval_seq_len,
                "eval_s": time.perf_counter() - t}

    def train_rung(self, rung: str, steps: int, stop_after: int | None = None) -> dict[str, Any]:
        cfg = rung_config(self.params, rung, steps, self.args, self.seq_len)
        st = self.student(cfg)
        _sync(self.device)
        with tempfile.TemporaryDirectory(prefix=f"gpu-ladder-{rung}-", dir=self.args.tmp) as ckpt:
            t = time.perf_counter()
            with _autocast(self.device, self.args.precision):
                res = train(st.model, self.arrays["train"], cfg.train, seed=cfg.seed, teacher=self.teacher,
                            checkpoint_dir=Path(ckpt), progress=False, stop_after=stop_after,
                            val_blocks=self.arrays["val"], refresh_scale=st.refresh_scale)
            _sync(self.device)
            wall = time.perf_counter() - t
        return {"cfg": cfg, "model": st.model, "result": res, "wall_s": wall, "info": st.info}


def measure_step_time(lad: Ladder, warm_steps: int) -> dict[str, Any]:
    """Seconds per training step of the slowest-looking rung (ast-paper: refresh + decay), after warm-up."""
    steps = max(warm_steps, 4)
    times: list[float] = []
    # log_every 1 so on_step sees every step; no validation; stop before the final checkpoint is written
    cfg = rung_config(lad.params, "ast-paper", steps, lad.args, lad.seq_len,
                      ("train.log_every=1", "train.eval_every=0"))
    st = lad.student(cfg)
    _sync(lad.device)
    with tempfile.TemporaryDirectory(prefix="gpu-ladder-warm-", dir=lad.args.tmp) as ckpt:
        last = [time.perf_counter()]

        def on_step(_log) -> None:  # type: ignore[no-untyped-def]
            _sync(lad.device)
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now

        with _autocast(lad.device, lad.args.precision):
            train(st.model, lad.arrays["train"], cfg.train, seed=cfg.seed, teacher=lad.teacher,
                  checkpoint_dir=Path(ckpt), progress=False, on_step=on_step, stop_after=steps - 1)
    del st
    steady = times[2:] or times
    return {"warm_steps": len(times), "step_s_all": times, "step_s": statistics.median(steady),
            "tokens_per_step": lad.args.batch * lad.seq_len}


def budget(step_s: float, tokens_per_step: int, seconds: float, fraction: float) -> int:
    """Steps that fit ``fraction`` of ``seconds`` of training at ``step_s`` per step (≥ 4)."""
    return max(4, int(seconds * fraction / step_s))


def result_row(rung: str, steps: int, seed: int, metrics: dict[str, Any], history: list[dict],
               wall_s: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One job in the shape :func:`bench.fair_ladder.summarize` reads."""
    return {"job": {"steps": steps, "seed": seed, "rung": rung}, "metrics": metrics, "history": history,
            "wall_s": wall_s, **(extra or {})}


def render(report: dict[str, Any]) -> str:
    rows = report["rows"]
    b = report["budget"]
    lines = [
        "## Fair method ladder on a GPU: adaptive vs fixed mask with the same distillation",
        "",
        f"Run {report['stamp']['date']} at commit {report['stamp']['commit']} on {report['device']} "
        f"(torch {report['stamp']['torch']}); model `{report['model']}`; params `{report['params']}`; "
        f"precision {report['precision']}.",
        "",
        f"Budget: {b['steps']} steps × {b['tokens_per_step']:,} tokens = {b['tokens']:,} tokens per trained rung "
        f"({b['epochs']:.1f} epochs over {report['data']['train_tokens']:,} C4 tokens); "
        + (f"sized from a {b['warm_steps']}-step warm-up at {b['step_s']:.3f} s/step for "
           f"{b['seconds_per_rung']:.0f} s per rung; " if b.get("step_s") else "fixed by --steps; ")
        + ("meets" if b["tokens"] >= TARGET_TOKENS else "is below")
        + f" the {TARGET_TOKENS:,}-token target.",
        "",
        f"Evaluation: WikiText-2 test, {rows[0]['windows'] if rows else '?'} windows × {report['eval_seq_len']} "
        "tokens (float32); 95% bootstrap intervals over windows; the ratio to the fixed-mask control is paired on the same "
        "windows. One initial Wanda mask for every trained rung "
        f"({report['calib_blocks']} calibration blocks × {report['seq_len']} tokens), one block order, one "
        "online teacher.",
        "",
        table(rows),
        "Verdicts (better or worse than the fixed-mask control only when the paired interval excludes 1):",
        "",
        *[f"- {v}" for v in verdicts(rows)],
        "",
        "C4 validation perplexity vs training tokens (held-out blocks):",
        "",
    ]
    for name, pts in report["curves"].items():
        lines.append(f"- {name}: " + ", ".join(f"{int(t):,} → {p:.2f}" for t, p in pts))
    lines += ["", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            print("no CUDA: skipped", file=sys.stderr)
            return 2
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (evaluation, master weights)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_run = time.perf_counter()
    lad = Ladder(args)
    print(f"loaded {args.model} + teacher in {lad.load_s:.1f} s on {_device_name(lad.device)}", flush=True)

    if args.steps:
        steps, warm = args.steps, {}
    else:
        warm = measure_step_time(lad, args.warm_steps)
        steps = budget(warm["step_s"], warm["tokens_per_step"], args.seconds_per_rung, args.train_fraction)
        print(f"warm-up: {warm['step_s']:.3f} s/step ({warm['tokens_per_step'] / warm['step_s']:,.0f} tokens/s) → "
              f"{steps} steps per rung", flush=True)
    tokens_per_step = args.batch * lad.seq_len
    results: list[dict[str, Any]] = []
    timings: dict[str, float] = {}
    report: dict[str, Any] = {}

    def write() -> None:
        rows = summarize(results) if results else []
        report.update({
            "stamp": stamp(), "device": _device_name(lad.device), "model": args.model, "params": args.params,
            "precision": args.precision, "command": "python -m bench.gpu_ladder " + " ".join(sys.argv[1:]),
            "seed": args.seed, "seq_len": lad.seq_len, "eval_seq_len": lad.eval_seq_len,
            "calib_blocks": int(len(lad.arrays["calib"])),
            "data": {**lad.manifest["counts"], "sources": lad.manifest.get("sources"),
                     "files": lad.manifest["files"]},
            "budget": {"steps": steps, "tokens_per_step": tokens_per_step, "tokens": steps * tokens_per_step,
                       "epochs": steps * args.batch / max(1, len(lad.arrays["train"])),
                       "seconds_per_rung": args.seconds_per_rung, "target_tokens": TARGET_TOKENS,
                       **{k: v for k, v in warm.items() if k != "step_s_all"}},
            "rows": rows,
            "curves": {r["job"]["rung"]: [[h["tokens"], h["val_ppl"]] for h in r["history"] if "val_ppl" in h]
                       for r in results if r["history"]},
            "jobs": [{k: r[k] for k in ("job", "wall_s", "info") if k in r} for r in results],
            "timings_s": {**timings, "total": time.perf_counter() - t_run},
        })
        write_json(out / "gpu_ladder.json", report)
        atomic_write_text(out / "gpu_ladder.md", render(report))

    # dense: the reference every "gap closed" needs (evaluation only)
    t = time.perf_counter()
    dense_m = lad.evaluate(copy.deepcopy(lad.dense).to(lad.device))
    timings["dense"] = time.perf_counter() - t
    print(f"dense: ppl {dense_m['ppl_wikitext2']:.3f} ({dense_m['ppl_windows']} windows, "
          f"{timings['dense']:.1f} s)", flush=True)
    dense_ppl = dense_m["ppl_wikitext2"]
    results.append(result_row("dense", steps, args.seed, {**dense_m, "ppl_wikitext2_dense": dense_ppl,
                                                          "tokens_trained": 0}, [], timings["dense"]))
    write()

    for rung in args.rungs:
        t = time.perf_counter()
        if rung in TRAINED:
            r = lad.train_rung(rung, steps)
            m = lad.evaluate(r["model"])
            res = r["result"]
            metrics = {**m, "ppl_wikitext2_dense": dense_ppl, "tokens_trained": res.tokens,
                       "train_s": r["wall_s"], "tokens_per_s_wall": res.tokens / max(r["wall_s"], 1e-9)}
            results.append(result_row(rung, steps, args.seed, metrics, res.history, r["wall_s"],
                                      {"info": r["info"]}))
            del r
        elif rung.startswith("oneshot-"):
            cfg = rung_config(lad.params, rung, steps, args, lad.seq_len)
            st = lad.student(cfg)
            _sync(lad.device)
            prune_s = time.perf_counter() - t
            m = lad.evaluate(st.model)
            results.append(result_row(rung, steps, args.seed, {**m, "ppl_wikitext2_dense": dense_ppl,
                                                                "tokens_trained": 0, "prune_s": prune_s},
                                      [], prune_s, {"info": st.info}))
            del st
        else:
            raise SystemExit(f"unknown rung {rung!r}: choose from {', '.join((*TRAINED, 'oneshot-sparsegpt'))}")
        timings[rung] = time.perf_counter() - t
        if lad.device.type == "cuda":
            timings[f"{rung}_peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.empty_cache()
        last = results[-1]["metrics"]
        print(f"{rung}: ppl {last['ppl_wikitext2']:.3f} [{last['ppl_wikitext2_ci95'][0]:.3f}, "
              f"{last['ppl_wikitext2_ci95'][1]:.3f}], {last['tokens_trained']:,} tokens, "
              f"{timings[rung]:.1f} s", flush=True)
        write()
    print(table(report["rows"]), end="")
    for v in verdicts(report["rows"]):
        print("-", v)
    print(f"total {time.perf_counter() - t_run:.1f} s; wrote {out / 'gpu_ladder.json'} and gpu_ladder.md")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_ladder", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="tokenize the C4 sample and WikiText-2 test once (CPU, here)")
    p.add_argument("--out", default=".device/data")
    p.add_argument("--model", default="embedded:smollm2-135m", help="whose tokenizer")
    p.add_argument("--sources", nargs="+", default=["c4", "c4-realnewslike"],
                   help="data sources concatenated in this order (ast_core.data names or paths)")
    p.add_argument("--max-docs", type=int, default=None, help="documents per source (tests)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--val-blocks", type=int, default=32)
    p.add_argument("--calib-blocks", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-wiki-tokens", type=int, default=None, help="cut WikiText-2 (tests only)")
    r = sub.add_parser("run", help="train and evaluate the rungs (GPU)")
    r.add_argument("--data", default=".device/data")
    r.add_argument("--model", default="embedded:smollm2-135m")
    r.add_argument("--params", default="params/smollm2-quick.yaml")
    r.add_argument("--device", default="cuda")
    r.add_argument("--precision", choices=("autocast", "fp32"), default="autocast",
                   help="autocast: fp32 master weights, bf16 autocast, bf16 teacher; fp32: everything fp32")
    r.add_argument("--rungs", nargs="+", default=[*TRAINED, "oneshot-sparsegpt"])
    r.add_argument("--seconds-per-rung", type=float, default=75.0, help="training time per rung")
    r.add_argument("--train-fraction", type=float, default=0.92,
                   help="share of --seconds-per-rung spent in steps (the rest: validation, checkpoint)")
    r.add_argument("--warm-steps", type=int, default=8, help="timing warm-up steps (the first 2 are dropped)")
    r.add_argument("--steps", type=int, default=None, help="fixed steps per rung (skips the warm-up)")
    r.add_argument("--batch", type=int, default=32, help="blocks per step")
    r.add_argument("--curve-points", type=int, default=8, help="C4 validation points along each run")
    r.add_argument("--windows", type=lambda v: None if v == "all" else int(v), default=None,
                   help="WikiText-2 windows (default all: the whole test split)")
    r.add_argument("--eval-batch", type=int, default=16)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--tmp", default=None, help="where the (temporary) checkpoints go")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    r.add_argument("--out-dir", default="bench/results/gpu")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return prepare(args) if args.cmd == "prepare" else run(args)


if __name__ == "__main__":
    raise SystemExit(main())
