"""``ast-pipeline``: run the whole pipeline, one stage, or verify an export.

Every expected failure (bad params, missing input, mismatched cache, corrupt
checkpoint, diverged training) exits non-zero with one line naming the cause,
no traceback; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .common import STAGES


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ast-pipeline", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--params", required=True, help="params/NAME.yaml")
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one param (repeatable)")
        sp.add_argument("--out", default=None, help="run directory (default artifacts/<name>/)")
        sp.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
        sp.add_argument("--no-progress", action="store_true", help="no progress bars")
        sp.add_argument("--wait", action="store_true",
                        help="if another process is writing the run directory, wait for it instead of exiting 2")

    common(sub.add_parser("run", help="all five stages"))
    st = sub.add_parser("stage", help="one stage")
    st.add_argument("stage", choices=STAGES)
    common(st)
    ch = sub.add_parser("check", help="validate a params file and print the resolved config")
    ch.add_argument("--params", required=True)
    ch.add_argument("--set", dest="overrides", action="append", default=[])
    v = sub.add_parser("verify", help="exit 0 only if every sparse linear in an export is exactly N:M")
    v.add_argument("path", help="DIR/export/hf")
    v.add_argument("--n", type=int, default=2)
    v.add_argument("--m", type=int, default=4)
    em = sub.add_parser("evaluate-model", help="perplexity + zero-shot of any checkpoint on a preset's windows and tasks")
    em.add_argument("path", help="a model directory (e.g. DIR/export/hf) or a hub id")
    em.add_argument("--adapter", default=None, help="a PEFT adapter directory (e.g. DIR/export/hf/adapter)")
    em.add_argument("--params", required=True, help="params/NAME.yaml: its evaluate section sets windows and tasks")
    em.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    em.add_argument("--tokenizer", default=None, help="tokenizer directory or hub id (default: PATH)")
    em.add_argument("--json", default=None, help="also write the scores to this JSON file")
    tp = sub.add_parser("tasks-path", help="print the folder of converted zero-shot tasks for lm_eval --include_path")
    tp.add_argument("--tasks", default=None, help="comma-separated task names (default: every task the mirror has)")
    vr = sub.add_parser("verify-run", help="check every recorded checksum in a run directory (exit 2 on a mismatch)")
    vr.add_argument("path", help="the run directory (--out)")
    lr = sub.add_parser("log-run", help="log a finished run directory to MLflow after the fact")
    lr.add_argument("path", help="the run directory (--out)")
    lr.add_argument("--params", default=None, help="the params file it ran with (recorded as a tag)")
    lr.add_argument("--force", action="store_true", help="log it even when MLflow already holds a run of it")
    return p


def _expected_errors() -> tuple[type[BaseException], ...]:
    """The project's own errors (bad params, files, artifacts) and the OS's (a missing or unreadable file)."""
    from ast_core.errors import ASTError
    return (ASTError, OSError)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print("interrupted; continue with --resume", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - classified below
        if args.debug or not isinstance(exc, _expected_errors()):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    from .config import load_config
    if args.command == "verify":
        from ast_core.export import verify_hf_dir
        report = verify_hf_dir(Path(args.path), args.n, args.m)
        print(report)
        return 0 if report.ok else 1
    if args.command == "tasks-path":
        from ast_core.zeroshot import include_path

        from .common import StageError
        try:
            print(include_path(args.tasks.split(",") if args.tasks else None))
        except ValueError as err:  # no mirror, or none of the tasks in it
            raise StageError(str(err)) from err
        return 0
    if args.command == "verify-run":
        from .verify_run import verify_run
        report = verify_run(Path(args.path))
        print(report.text())
        return 0 if report.ok else 2
    if args.command == "log-run":
        from .tracking import log_run_dir
        run_id, new = log_run_dir(Path(args.path), params_file=args.params, force=args.force)
        print(f"logged {args.path} to MLflow as run {run_id}" if new else
              f"{args.path} is already logged to MLflow as run {run_id} (--force logs it again)")
        return 0
    cfg = load_config(args.params, args.overrides)  # validated before any work
    if args.command == "evaluate-model":
        from .evaluate import evaluate_model
        evaluate_model(cfg, args.path, args.adapter, args.tokenizer, args.json)
        return 0
    if args.command == "check":
        import yaml
        print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        return 0
    from ast_core.distributed import DistEnv
    env = DistEnv.from_env()
    if env.enabled and not (args.command == "stage" and args.stage == "train"):
        from .common import StageError
        raise StageError(f"only `stage train` runs under torchrun ({env.world_size} processes here); run "
                         f"prepare, cache-teacher, compile and evaluate as single processes "
                         f"(see README, 'Several GPUs')")
    if not env.is_main:
        import os
        os.environ["AST_TRACKING"] = "off"  # rank 0 alone talks to MLflow
    from .common import RunContext, configure_threads
    from .pipeline import run_all, run_stage
    configure_threads()
    ctx = RunContext.create(cfg, args.out, resume=args.resume, progress=not args.no_progress, wait=args.wait)
    if args.command == "run":
        metrics = run_all(ctx, params_file=args.params)
        ci = metrics.get("ppl_wikitext2_ci95")
        print(f"done: {ctx.out / 'metrics.json'} (WikiText-2 ppl {metrics['ppl_wikitext2']:.2f}"
              f"{f' [{ci[0]:.2f}, {ci[1]:.2f}]' if ci else ''} sparse, {metrics['ppl_wikitext2_dense']:.2f} dense, "
              f"on {metrics['ppl_windows']}×{metrics['ppl_seq_len']} test tokens"
              f"{'' if cfg.evaluate.max_windows is None else ', a slice of the split'})")
    else:
        ctx.out.mkdir(parents=True, exist_ok=True)  # stages follow their inputs (DVC re-runs them)
        run_stage(ctx, args.stage, params_file=args.params)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
