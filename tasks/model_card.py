"""The model card of ``export/hf/README.md``: what a user of the export needs to know.

Hugging Face model-card conventions: YAML front matter (``base_model``,
``library_name``, ``tags``, ``pipeline_tag``) and a markdown body. The compile
stage writes it without numbers (nothing is measured yet); the evaluate stage
rewrites it with the numbers it measured on the exported artifact itself.
"""

from __future__ import annotations

import yaml

from .config import PipelineConfig

EMBEDDED_HUB_IDS = {"embedded:smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
"""The hub model each embedded spec is a copy of (the embedded one is a de-quantised Q4_1 GGUF)."""


def base_model(student: str) -> str | None:
    """The ``base_model`` of the card: a hub id, or None for a random/local model."""
    if student in EMBEDDED_HUB_IDS:
        return EMBEDDED_HUB_IDS[student]
    if ":" in student or student.startswith((".", "/", "~")) or student.endswith(".gguf") or student.count("/") != 1:
        return None
    return student


def render(cfg: PipelineConfig, train_info: dict, mode: str, metrics: dict | None = None) -> str:
    """The card. ``mode`` is the export's SLoRB handling (``adapter``, ``folded``, ``none``)."""
    n, m = cfg.sparsity.n, cfg.sparsity.m
    t = cfg.train
    adapter = mode == "adapter"
    front: dict = {}
    if (b := base_model(cfg.model.student)) is not None:
        front["base_model"] = b
    front["library_name"] = "peft" if adapter else "transformers"
    front["pipeline_tag"] = "text-generation"
    front["tags"] = ["sparsity", f"{n}:{m}", "semi-structured-sparsity", "pruning", "ast", t.method] + (
        ["slorb", "lora", "peft"] if adapter else [])
    tokens = train_info.get("tokens_trained", 0)
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip(), "---", "",
             f"# {cfg.name}: {n}:{m} sparse {cfg.model.student} ({t.method})", ""]
    lines += [
        f"Every linear layer of the transformer blocks keeps {n} of each {m} consecutive weights "
        f"(semi-structured {n}:{m} sparsity; `sparsity.json` lists the tensors, `masks.safetensors` their masks). "
        "It was retrained with the Adaptive Sparse Trainer (AST; Huang et al., AAAI 2025, arXiv 2407.20584): "
        "the mask is recomputed during training while an annealed decay pulls the pruned weights to zero, "
        "and the dense model teaches the sparse one by knowledge distillation.", ""]
    if adapter:
        lines += [
            f"**SLoRB** (sparse low-rank boosting, group size k = {t.slorb_group}) adds a small dense branch "
            "`y += S·(X·x)` to each sparse layer, where `X` sums the input over groups of k columns. It cannot be "
            f"folded into a {n}:{m} weight, so it ships as a standard PEFT LoRA adapter in `adapter/` "
            "(`lora_A = X`, rank in_features/k; `lora_B = S`; scaling 1).", ""]
    lines += ["## Recipe", "",
              "| | |", "|---|---|",
              f"| student / teacher | `{cfg.model.student}` / {f'`{cfg.model.teacher}`' if cfg.model.teacher else 'its own dense weights'} |",
              f"| method | {t.method}, initial mask {cfg.sparsity.init_mask}, refresh every {t.refresh_every} steps "
              f"by {t.refresh_score} |",
              f"| training data | {cfg.data.source}, blocks of {cfg.data.seq_len} tokens |",
              f"| steps × batch | {t.steps} × {t.batch_size * t.grad_accum} |",
              f"| tokens trained | {tokens:,} |",
              f"| lr / λ_max | {t.lr:g} (min {t.min_lr:g}) / {t.lambda_max:g} |",
              f"| distillation | α = {t.kd_alpha:g} (α·KL + (1−α)·CE), temperature {t.temperature:g} |",
              f"| dtype | {cfg.model.dtype} |", ""]
    lines += ["## Measured", ""]
    if metrics is None:
        lines += ["Not evaluated yet: the evaluate stage writes its numbers here.", ""]
    else:
        lines += _measured(metrics, adapter)
    lines += ["## How to load", ""]
    if adapter:
        lines += ["The boosted model (what the numbers above measure):", "", "```python",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer", "from peft import PeftModel",
                  'tok = AutoTokenizer.from_pretrained("PATH")',
                  'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("PATH"), "PATH/adapter")',
                  "```", "",
                  f"Without the adapter, `AutoModelForCausalLM.from_pretrained(\"PATH\")` is the {n}:{m} base alone "
                  "(every sparse weight exactly {n}:{m}, so a 2:4 kernel can run it); its scores are in the last row above. "
                  "`model.merge_and_unload()` gives one dense model with the same outputs, but its weights are no "
                  f"longer {n}:{m}.".replace("{n}", str(n)).replace("{m}", str(m)), ""]
    else:
        lines += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  'model = AutoModelForCausalLM.from_pretrained("PATH")', "```", ""]
    lines += ["Zero-shot with the stock lm-eval CLI (`ast-pipeline tasks-path` prints the folder of the converted "
              "local tasks):", "", "```bash",
              "lm_eval --model hf --model_args pretrained=PATH" + (",peft=PATH/adapter" if adapter else "")
              + " --include_path \"$(ast-pipeline tasks-path)\" --tasks "
              + ",".join(cfg.evaluate.zero_shot.tasks) + " --num_fewshot 0"
              + (f" --limit {cfg.evaluate.zero_shot.limit}" if cfg.evaluate.zero_shot.limit else "")
              + f" --batch_size {cfg.evaluate.zero_shot.batch_size}", "```", "",
              f"`ast-pipeline verify PATH` checks that every sparse weight is exactly {n}:{m}; "
              "`ast-pipeline evaluate-model PATH" + (" --adapter PATH/adapter" if adapter else "")
              + " --params <preset>` measures any checkpoint on the same windows and tasks.", ""]
    return "\n".join(lines)


def _measured(mt: dict, adapter: bool) -> list[str]:
    zs, zsd = mt.get("zero_shot") or {}, mt.get("zero_shot_dense") or {}
    slice_ = (f"WikiText-2 test, {mt['ppl_windows']} windows × {mt['ppl_seq_len']} tokens (non-overlapping, "
              "the papers' concatenation)")
    out = [f"Measured on this exported checkpoint, loaded the stock way. Perplexity: {slice_}."]
    if zs:
        n = mt.get("zero_shot_docs") or {}
        docs = ", ".join(f"{t} {n[t]}" for t in zs if t in n)
        out[-1] += f" Zero-shot: lm-eval `acc`, 0-shot, documents per task: {docs or 'all'}."
    ci = mt.get("ppl_wikitext2_ci95")
    head = ["| model | WikiText-2 ppl | " + " | ".join(zs) + " |", "|---|---:|" + "---:|" * len(zs)]
    row = lambda name, ppl, scores, extra="": (  # noqa: E731
        f"| {name} | {ppl:.2f}{extra} | " + " | ".join(f"{scores[t]:.3f}" if t in scores else "" for t in zs) + " |")
    rows = [row("dense teacher", mt["ppl_wikitext2_dense"], zsd),
            row("this model" + (" (base + adapter)" if adapter else ""), mt["ppl_wikitext2"], zs,
                f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")]
    if adapter and mt.get("ppl_wikitext2_base_only") is not None:
        rows.append(row("2:4 base alone, without the adapter", mt["ppl_wikitext2_base_only"],
                        mt.get("zero_shot_base_only") or {}))
    out += ["", *head, *rows, "",
            "[lo, hi]: 95% bootstrap interval over the windows. "
            f"The in-memory trained model scored ppl {mt['ppl_wikitext2_trained']:.2f} "
            f"{windows_note(mt)} "
            f"(export check: {mt['export_check']['summary']})."]
    return out + [""]


def windows_note(m: dict) -> str:
    """On which windows the trained model (and the base alone) were scored."""
    n = m.get("ppl_windows_trained", m["ppl_windows"])
    return "on the same windows" if n == m["ppl_windows"] else f"on the first {n} of those windows"
