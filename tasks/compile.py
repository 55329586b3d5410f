"""Stage 4, compile: verify exact N:M, export (a) stock HF checkpoint, (b) compressed
2:4, (c) on CUDA the cuSPARSELt model with a speed table (skipped on CPU, with
the reason recorded, never faked).
"""

from __future__ import annotations

from ast_core.trained import load_trained
from ast_core.atomic import atomic_write_json, atomic_write_text
from ast_core.compressed import byte_report, save_compressed
from ast_core.export import export_hf, verify_model
from ast_core.kernels import cuda_available
from ast_core.models import load_tokenizer
from ast_core.sparse import SparsityError, sparse_layers

from . import model_card
from .common import RunContext, hash_json, log


def fingerprint(ctx: RunContext) -> str:
    return hash_json({"train": ctx.require("train")["fingerprint"],
                      "compile": ctx.cfg.compile.model_dump(mode="json")})


def run(ctx: RunContext) -> dict:
    fp = fingerprint(ctx)
    if ctx.is_done("compile", fp):
        log.info("compile: up to date")
        return ctx.done("compile")
    c = ctx.cfg
    ctx.require("train")
    with ctx.checked("train"):
        model = load_trained(ctx.stage_dir("train") / "final", ctx.cfg.model.trust_remote_code)
    out = ctx.stage_dir("compile")
    export_root = ctx.out / "export"
    info: dict = {"sparse_layers": sum(1 for _ in sparse_layers(model))}
    if info["sparse_layers"]:
        report = verify_model(model, c.sparsity.n, c.sparsity.m)
        if not report.ok:
            raise SparsityError(f"compile refused: {report}")
        info["verify"] = str(report)
    tok = load_tokenizer(c.model.student, c.model.trust_remote_code)
    info["hf"] = export_hf(model, tok, export_root / "hf", c.sparsity.n, c.sparsity.m)
    # the card without numbers; the evaluate stage rewrites it with what it measured on this export
    atomic_write_text(export_root / "hf" / "README.md",
                      model_card.render(c, ctx.require("train"), info["hf"]["slorb"]))
    if c.compile.compressed and info["sparse_layers"] and c.sparsity.n == 2 and c.sparsity.m == 4:
        save_compressed(model, export_root / "compressed", c.sparsity.n, c.sparsity.m)
        info["compressed"] = byte_report(export_root / "compressed")
        print(f"compressed 2:4 export: {info['compressed']}")
    ok, reason = cuda_available()
    if c.compile.cuda_kernels == "off":
        info["kernels"] = {"skipped": "compile.cuda_kernels is off"}
    elif not ok:
        info["kernels"] = {"skipped": reason}
        log.info("compile: cuSPARSELt kernels skipped: %s", reason)
    else:
        from ast_core.kernels import kernel_report
        info["kernels"] = kernel_report(model, c.compile.speed_tokens, export_root / "kernels")
    atomic_write_json(out / "report.json", info)
    atomic_write_text(out / "report.txt", f"{info.get('verify', 'dense model')}\n")
    ctx.mark_done("compile", fp, **info)
    return ctx.done("compile")
