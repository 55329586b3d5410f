"""Training throughput: tokens/s of the real training step, and how much of the machine it uses.

Budget is quality on this machine (a CPU ladder rung is bounded by tokens/s),
so this measures, in one run and side by side:

  * a large fp32 GEMM (``--gemm`` square, the best case for the BLAS), in FLOP/s;
  * the project's training loop (:func:`ast_core.train.train`) on SmolLM2-135M
    with the preset's shapes and method, distilling from a sampled teacher
    cache built on the fly, in tokens/s and in achieved FLOP/s, where a step's
    FLOPs are 6 × (matmul parameters, LM head included) × tokens + the
    attention score/value products (12 × layers × d_model × seq_len per token);
  * a profile of one step (the ops that take the time).

The ratio achieved / GEMM FLOP/s says how far the step is from what the
machine's BLAS can do; both are measured in the same process, minutes apart,
so a busy machine slows both. Writes ``bench/results/train_throughput.{json,md}``.

    python -m bench.train_throughput [--params params/smollm2-quick.yaml] [--steps 4] [--gemm 2048]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ast_core.atomic import atomic_write_text  # noqa: E402
from bench.ladder import resolve_params  # noqa: E402
from bench.runner import RESULTS, stamp, write_json  # noqa: E402
from tasks.common import configure_threads  # noqa: E402
from tasks.config import load_config  # noqa: E402
from tasks.tables import markdown_table  # noqa: E402


def gemm_flops(n: int, reps: int = 5) -> float:
    """FLOP/s of an n×n @ n×n fp32 matmul (best of ``reps`` after one warm-up)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def step_flops(model: torch.nn.Module, tokens: int, seq_len: int) -> float:
    """Forward + backward FLOPs of one step: 6·P_matmul·T + 12·layers·d·L·T (attention products)."""
    from ast_core.sparse import SparseLinear
    cfg = model.config
    # every linear layer (the 2:4 ones compute dense W ⊙ m: sparsity saves no FLOPs here), LM head included;
    # SLoRB's small projections are left out
    matmul = sum(m.weight.numel() for name, m in model.named_modules()
                 if isinstance(m, (torch.nn.Linear, SparseLinear)) and ".side" not in name)
    attn = 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len
    return (6 * matmul + attn) * tokens


def render_body(r: dict, image=None) -> str:  # type: ignore[no-untyped-def]
    """The section text (``train_throughput.md`` and ``docs/RESULTS.md``)."""
    st = r["stamp"]
    return "\n".join([
        f"Measured {st['date']} on {st['machine']} (commit {st['commit']}, {st['threads']} threads); "
        f"`{r['params']}`, method {r['method']}, {r['batch']}×{r['seq_len']} tokens per step, teacher cache "
        f"{r['teacher_cache']}, {r['timed_steps']} timed steps after one warm-up.",
        "",
        markdown_table(["measure", "value"], [
            ["training tokens/s", f"{r['tokens_per_s']:.1f}"], ["step time", f"{r['step_s']:.2f} s"],
            ["step FLOPs (6·P·T + attention)", f"{r['step_flop']:.3g}"],
            ["achieved FLOP/s", f"{r['achieved_flops'] / 1e9:.1f} G"],
            [f"fp32 GEMM {r['gemm_n']}³ FLOP/s (best of before/after)", f"{r['gemm_flops'] / 1e9:.1f} G"],
            ["achieved / GEMM", f"{r['fraction_of_gemm']:.1%}"]]),
        "Top ops of one forward+backward (self CPU time):",
        "",
        "```",
        r["profile_top"].rstrip(),
        "```",
        "",
        f"Command: `{r['command']}`",
        ""])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.train_throughput", description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params/smollm2-quick.yaml")
    ap.add_argument("--steps", type=int, default=4, help="timed steps (after one warm-up step)")
    ap.add_argument("--gemm", type=int, default=2048)
    ap.add_argument("--method", default="ast-naive")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    configure_threads()

    from ast_core.models import load_model
    from ast_core.recipe import Recipe, prepare_student
    from ast_core.teacher_cache import TeacherCache, build_cache, fingerprint
    from ast_core.train import CachedTeacher, train
    from tasks.train import recipe_of

    cfg = load_config(resolve_params(args.params), [f"train.method={args.method}", "train.eval_every=0",
                                                    f"train.steps={args.steps + 1}", "train.warmup_steps=1",
                                                    "train.t0_steps=1", f"train.checkpoint_every={args.steps + 1}"])
    t, L = cfg.train, cfg.data.seq_len
    n_blocks = (args.steps + 1) * t.batch_size * t.grad_accum
    blocks = np.random.default_rng(0).integers(0, 49152, size=(n_blocks, L)).astype(np.uint16)
    gemm_before = gemm_flops(args.gemm)

    teacher = load_model(cfg.model.student)
    recipe: Recipe = recipe_of(cfg)
    calib = [torch.from_numpy(blocks[:4].astype(np.int64))]
    student = prepare_student(load_model(cfg.model.student), recipe, lambda: calib).model
    with tempfile.TemporaryDirectory() as tmp:
        fp = fingerprint(teacher="t", tokenizer="x", data="d", seq_len=L, fmt=cfg.teacher_cache.format,
                         k=cfg.teacher_cache.k, samples=cfg.teacher_cache.samples, temperature=t.temperature,
                         seed=0)
        cache = build_cache(Path(tmp) / "cache", teacher, blocks, fp, batch_size=8, progress=False)
        del teacher
        res = train(student, blocks, t, seed=0, teacher=CachedTeacher(TeacherCache(Path(tmp) / "cache", fp)),
                    checkpoint_dir=Path(tmp) / "ckpt", progress=False,
                    refresh_scale={n: torch.ones(m.in_features) for n, m in student.named_modules()
                                   if type(m).__name__ == "SparseLinear"} if t.wanda_refresh else None)
        del cache
        timed = [h for h in res.history if "tokens_per_s" in h][1:]  # the first step warms up
        tok_s = sum(h["tokens_per_s"] for h in timed) / len(timed)

        # one more step under the profiler: where the time goes
        from torch.profiler import ProfilerActivity, profile
        ids = torch.from_numpy(blocks[:t.batch_size].astype(np.int64))
        student.train()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = student(ids)
            loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]).float(),
                                                     ids[:, 1:].reshape(-1))
            loss.backward()
        top = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    gemm_after = gemm_flops(args.gemm)
    gemm = max(gemm_before, gemm_after)
    tokens_per_step = t.batch_size * t.grad_accum * L
    achieved = step_flops(student, tokens_per_step, L) / (tokens_per_step / tok_s)
    result = {"stamp": stamp(), "params": args.params, "method": args.method,
              "batch": t.batch_size * t.grad_accum, "seq_len": L, "teacher_cache": cfg.teacher_cache.format,
              "timed_steps": len(timed), "tokens_per_s": tok_s, "step_s": tokens_per_step / tok_s,
              "step_flop": step_flops(student, tokens_per_step, L), "achieved_flops": achieved,
              "gemm_n": args.gemm, "gemm_flops": gemm, "gemm_flops_before_after": [gemm_before, gemm_after],
              "fraction_of_gemm": achieved / gemm, "profile_top": top,
              "command": "python -m bench.train_throughput " + " ".join(argv if argv is not None else sys.argv[1:])}
    write_json(args.out_dir / "train_throughput.json", result)
    md = "## Training throughput\n\n" + render_body(result)
    atomic_write_text(args.out_dir / "train_throughput.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
