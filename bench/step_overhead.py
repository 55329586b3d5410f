"""Step-time overhead of AST over plain masked fine-tuning (goal ≤ 1.03×, docs/ARCHITECTURE.md).

Two copies of SmolLM2-135M, sparsified with the same 2:4 magnitude masks, are
trained side by side on the same batches, one step of each in turn (the order
alternates every step, so drift on a shared machine hits both alike):

  (a) plain: forward, CE loss, backward, clip 1.0, ``torch.optim.AdamW`` step;
  (b) AST:   the same with :class:`ASTAdamW` (λ > 0 on every masked weight) and
      ``refresh_masks`` every ``--refresh-every`` steps (its cost is in the step).

Warm-up steps are excluded. Reports median and mean step times and their
ratios (the mean carries the amortised refresh; the median mostly does not),
plus the parts: forward+backward, optimizer step, refresh, and a side
measurement of the optimizer step alone (torch AdamW vs ASTAdamW at λ = 0 vs
λ > 0) that separates the decay's own cost from the implementation. Writes
``bench/results/step_overhead.json``.

    python -m bench.step_overhead [--steps N] [--seq-len L] [--batch B]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]

from ast_core.models import load_model, load_tokenizer  # noqa: E402
from ast_core.optim import ASTAdamW, ASTSchedule, build_param_groups, masks_for  # noqa: E402
from ast_core.refresh import magnitude_nm_mask, refresh_masks, snapshot_masks  # noqa: E402
from ast_core.sparse import sparse_layers, sparsify  # noqa: E402
from bench.report import Body, Verdict, at_most, fmt  # noqa: E402
from tasks.tables import markdown_table  # noqa: E402

MODEL = "embedded:smollm2-135m"
# Random-weight stand-ins with real shapes, for machines without the embedded copy (a GPU box):
# step time depends on the shapes, not the values.
def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timers measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
C4 = REPO.parent / "shared" / "data" / "c4" / "c4-en-train.00000-of-01024.first1000.jsonl"


def make_batches(n: int, batch: int, seq_len: int, data: Path | None, vocab: int = 49152) -> list[torch.Tensor]:
    """``n`` batches of ``batch`` × ``seq_len`` tokens of C4 text (contiguous blocks); random ids without data."""
    if data is None:
        return list(torch.randint(0, vocab, (n, batch, seq_len), generator=torch.Generator().manual_seed(0)))
    tok = load_tokenizer(MODEL)
    need = n * batch * seq_len
    ids: list[int] = []
    with data.open(encoding="utf-8") as f:
        for line in f:
            ids.extend(tok(json.loads(line)["text"])["input_ids"])
            ids.append(tok.eos_token_id)
            if len(ids) >= need:
                break
    if len(ids) < need:
        raise SystemExit(f"{data} holds {len(ids)} tokens, need {need}; lower --steps/--batch/--seq-len")
    return list(torch.tensor(ids[:need]).view(n, batch, seq_len))


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor) -> tuple[float, float, float]:
    device = ids.device
    sync(device)
    t0 = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    sync(device)
    t1 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync(device)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, float(loss.detach())


def optimizer_breakdown(model: torch.nn.Module, lam: float, reps: int) -> dict[str, float]:
    """Median optimizer-step time, same gradients, three implementations, interleaved:
    torch's AdamW, ASTAdamW with λ = 0 (same arithmetic, no per-step allocations)
    and ASTAdamW with λ > 0. The last two differ only by the decay's extra work.
    lr = 0, so the weights do not change (every op still runs)."""
    gen = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(device)
    opts: dict[str, torch.optim.Optimizer] = {
        "torch_adamw": torch.optim.AdamW(build_param_groups(model), lr=0.0, betas=(0.9, 0.95), eps=1e-8),
        "ast_adamw_lambda0": ASTAdamW(build_param_groups(model), lr=0.0, masks=masks_for(model)),
        "ast_adamw": ASTAdamW(build_param_groups(model), lr=0.0, masks=masks_for(model)),
    }
    for g in opts["ast_adamw"].param_groups:
        g["sparse_decay"] = lam
    times: dict[str, list[float]] = {k: [] for k in opts}
    names = list(opts)
    for r in range(reps + 1):  # the first round allocates the state: not timed
        for name in names[r % 3:] + names[:r % 3]:
            sync(device)
            t0 = time.perf_counter()
            opts[name].step()
            sync(device)
            if r:
                times[name].append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    del opts
    return {k: statistics.median(v) for k, v in times.items()}


def summary(xs: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(xs), "mean_s": statistics.fmean(xs), "min_s": min(xs),
            "max_s": max(xs)}


# ----------------------------------------------------------------------------- report section

GOAL = 1.03  # AST step / plain masked fine-tuning step


def command_of(d: dict) -> str:
    return ("python -m bench.step_overhead" + f" --steps {d['measured_steps']} --warmup {d['warmup_steps']}"
            f" --batch {d['batch']} --seq-len {d['seq_len']} --refresh-every {d['refresh_every']}"
            f" --lambda-max {d['lambda']:g}" + (f" --threads {d['env']['threads']}" if d.get("env") else ""))


def render_body(d: dict, image: Callable[[str, str], str]) -> Body:
    p, a = d["plain"], d["ast"]
    ms = lambda x: fmt(1000 * x, ".1f") if x is not None else "—"  # noqa: E731
    rows = [["step (median)", ms(p["step"]["median_s"]), ms(a["step"]["median_s"]), fmt(d["ratio_median"], ".3f")],
            ["step (mean, carries the amortised refresh)", ms(p["step"]["mean_s"]), ms(a["step"]["mean_s"]),
             fmt(d["ratio_mean"], ".3f")],
            ["forward + backward (median)", ms(p["fwd_bwd"]["median_s"]), ms(a["fwd_bwd"]["median_s"]),
             fmt(a["fwd_bwd"]["median_s"] / p["fwd_bwd"]["median_s"], ".3f")],
            ["optimizer step (median)", ms(p["opt"]["median_s"]), ms(a["opt"]["median_s"]),
             fmt(a["opt"]["median_s"] / p["opt"]["median_s"], ".3f")]]
    lines = [f"SmolLM2-135M (`{d.get('model')}`), 2:4 magnitude masks, batch {d['batch']} × {d['seq_len']} tokens, "
             f"{d['measured_steps']} measured steps each (after {d['warmup_steps']} warm-up), plain and AST steps "
             f"interleaved (order alternating); AST: λ = {d['lambda']:g} on every masked weight, mask refresh every "
             f"{d['refresh_every']} steps. Plain: `{d.get('env', {}).get('plain_optimizer', 'torch AdamW')}`.", "",
             markdown_table(["", "plain ms", "AST ms", "AST / plain"], rows)]
    ref = d.get("refresh", {})
    if ref.get("count_measured"):
        lines += [f"Mask refresh: {fmt(1000 * ref['mean_s'], '.0f')} ms mean over {ref['count_measured']} refreshes "
                  f"(one every {d['refresh_every']} steps).", ""]
    bd = d.get("optimizer_breakdown_median_s")
    if bd:
        lines += ["Optimizer step alone (same gradients, interleaved, median): "
                  + ", ".join(f"{k} {fmt(1000 * v, '.0f')} ms" for k, v in bd.items()) + ".", ""]
    lines += [markdown_table(["ratio", "value"], [
        ["AST / plain, median step", fmt(d["ratio_median"], ".3f")],
        ["AST / plain, mean step", fmt(d["ratio_mean"], ".3f")],
        ["from the parts (extra optimizer time + amortised refresh)", fmt(d.get("ratio_from_parts"), ".3f")],
        ["decay + refresh alone (vs ASTAdamW at λ = 0)", fmt(d.get("ratio_decay_and_refresh_only"), ".3f")]])]
    lines.append(image("step_overhead.png", "AST vs plain step time"))
    worst = max(d["ratio_median"], d["ratio_mean"])
    v = Verdict(f"AST step ≤ {GOAL:g}× plain masked fine-tuning step",
                f"{worst:.3f}, the larger of the median and mean ratios", at_most(worst, GOAL))
    return Body("\n".join(lines), [v])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="measured steps per variant")
    ap.add_argument("--warmup", type=int, default=3, help="unmeasured steps per variant")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--refresh-every", type=int, default=10)
    ap.add_argument("--lambda-max", type=float, default=1e-4, help="held from step 0 (T0 = 0): decay always on")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--data", default=str(C4), help="a C4 jsonl, or 'none' for random token ids")
    ap.add_argument("--model", default=MODEL, help="a model spec (random:smollm2-135m or random:llama-1.1b: "
                    "those shapes with random weights, for a machine without the real weights)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads; 1 by default: on a shared 2-core box, 2 OpenMP threads "
                         "per process oversubscribe and make small ops 10-100x slower")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "step_overhead.json")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    total = args.warmup + args.steps
    device = torch.device(args.device)
    base = load_model(args.model)
    data = None if args.data == "none" else Path(args.data)
    batches = [b.to(device) for b in make_batches(total, args.batch, args.seq_len, data, base.config.vocab_size)]
    base.to(device)
    sparsify(base)
    with torch.no_grad():
        for _, layer in sparse_layers(base):
            layer.set_mask(magnitude_nm_mask(layer.weight))
    # Two fresh copies, so neither keeps the loader's memory layout (e.g. file-backed pages).
    plain_model, ast_model = copy.deepcopy(base), copy.deepcopy(base)
    del base
    plain_model.train()
    ast_model.train()

    sched = ASTSchedule(lambda_max=args.lambda_max, t0=0, peak_lr=args.lr, min_lr=args.lr / 10,
                        warmup_steps=args.warmup, total_steps=total)
    plain_opt = torch.optim.AdamW(build_param_groups(plain_model), lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    ast_opt = ASTAdamW(build_param_groups(ast_model), lr=args.lr, masks=masks_for(ast_model))
    initial = snapshot_masks(ast_model)

    rec: dict[str, dict[str, list[float]]] = {v: {"step": [], "fwd_bwd": [], "opt": [], "loss": []}
                                              for v in ("plain", "ast")}
    refresh_s: list[float] = []
    flips: list[dict[str, float]] = []

    def run(variant: str, i: int) -> None:
        t0 = time.perf_counter()
        if variant == "plain":
            for g in plain_opt.param_groups:
                g["lr"] = sched.lr(i)
            fb, opt_s, loss = train_step(plain_model, plain_opt, batches[i])
        else:
            sched.apply(ast_opt, i)
            fb, opt_s, loss = train_step(ast_model, ast_opt, batches[i])
            if (i + 1) % args.refresh_every == 0:
                r0 = time.perf_counter()
                stats = refresh_masks(ast_model, initial)
                sync(device)
                if i >= args.warmup:
                    refresh_s.append(time.perf_counter() - r0)
                flips.append({"step": i + 1, "rate_prev": stats.rate_prev, "rate_init": stats.rate_init})
        step_s = time.perf_counter() - t0
        if i >= args.warmup:
            for k, v in (("step", step_s), ("fwd_bwd", fb), ("opt", opt_s), ("loss", loss)):
                rec[variant][k].append(v)

    wall0 = time.perf_counter()
    for i in range(total):
        order = ("plain", "ast") if i % 2 == 0 else ("ast", "plain")
        for variant in order:
            run(variant, i)
        if i >= args.warmup:
            print(f"step {i + 1}/{total}: plain {rec['plain']['step'][-1]:.3f} s  ast {rec['ast']['step'][-1]:.3f} s",
                  flush=True)
    wall = time.perf_counter() - wall0

    print("optimizer breakdown ...", flush=True)
    breakdown = optimizer_breakdown(ast_model, args.lambda_max, reps=5)

    plain, ast = rec["plain"], rec["ast"]
    p_med, a_med = statistics.median(plain["step"]), statistics.median(ast["step"])
    p_mean, a_mean = statistics.fmean(plain["step"]), statistics.fmean(ast["step"])
    # Noise-robust estimate from the parts: extra optimizer time + amortised refresh.
    opt_extra = statistics.median(ast["opt"]) - statistics.median(plain["opt"])
    refresh_amortised = (sum(refresh_s) / len(ast["step"])) if refresh_s else 0.0
    from bench.runner import stamp
    result = {
        "stamp": stamp(),
        "model": args.model, "device": args.device if device.type == "cpu" else torch.cuda.get_device_name(device),
        "data": "random token ids" if data is None else str(data), "batch": args.batch, "seq_len": args.seq_len, "measured_steps": args.steps,
        "warmup_steps": args.warmup, "refresh_every": args.refresh_every, "lambda": args.lambda_max,
        "second_moment": ast_opt.defaults["second_moment"],
        "plain": {k: summary(v) for k, v in plain.items() if k != "loss"},
        "ast": {k: summary(v) for k, v in ast.items() if k != "loss"},
        "refresh": {"count_measured": len(refresh_s), **(summary(refresh_s) if refresh_s else {})},
        "ratio_median": a_med / p_med, "ratio_mean": a_mean / p_mean,
        "ratio_from_parts": 1.0 + (opt_extra + refresh_amortised) / p_med,
        # The decay's own cost, against the same allocation-free AdamW arithmetic (not torch's):
        "ratio_decay_and_refresh_only": 1.0 + (breakdown["ast_adamw"] - breakdown["ast_adamw_lambda0"]
                                               + refresh_amortised) / p_med,
        "optimizer_breakdown_median_s": breakdown,
        "goal": 1.03,
        "loss_first_last": {"plain": [plain["loss"][0], plain["loss"][-1]], "ast": [ast["loss"][0], ast["loss"][-1]]},
        "flip_rates": flips,
        "wall_s": wall,
        "env": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                "load_avg": os.getloadavg(), "python": platform.python_version(),
                "plain_optimizer": "torch.optim.AdamW (default implementation)"},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))

    def ms(x: float) -> str:
        return f"{1000 * x:8.1f} ms"
    print(f"\n{'':14}{'plain':>11}{'AST':>11}")
    for part in ("step", "fwd_bwd", "opt"):
        print(f"{part + ' median':14}{ms(statistics.median(plain[part]))}{ms(statistics.median(ast[part]))}")
    print(f"{'step mean':14}{ms(p_mean)}{ms(a_mean)}")
    if refresh_s:
        print(f"refresh: {ms(statistics.fmean(refresh_s))} mean over {len(refresh_s)} (every {args.refresh_every} steps)")
    print("optimizer step alone: " + ", ".join(f"{k} {ms(v).strip()}" for k, v in breakdown.items()))
    print(f"AST/plain: median {result['ratio_median']:.3f}  mean {result['ratio_mean']:.3f}  "
          f"from parts {result['ratio_from_parts']:.3f}  (goal ≤ 1.03)")
    print(f"decay + refresh alone (vs ASTAdamW at λ=0): {result['ratio_decay_and_refresh_only']:.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
