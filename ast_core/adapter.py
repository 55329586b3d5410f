"""SLoRB as a stock PEFT LoRA adapter, and loading an export the way a user does.

The SLoRB branch of a sparse layer is ``y += S·(X·x)`` with ``X`` ((d/k)×d) the
group-sum projection (or its trained version) and ``S`` (N×d/k). A PEFT LoRA
update is ``y += (α/r)·B·(A·x)``. So the branch *is* a LoRA adapter with

    lora_A = X   (rank r = in_features / k),   lora_B = S,   lora_alpha = r  (scaling 1),

no dropout and no bias. Ranks differ between layers whose ``in_features``
differ (LLaMA ``down_proj``: d = intermediate size), so the config carries the
most common rank as ``r``/``lora_alpha`` and the others in ``rank_pattern`` /
``alpha_pattern``. The only difference from the trained forward is how the
group sums are added up (a 0/1 matmul instead of a reshape-and-sum): floating
point summation order, nothing else (see ``tasks/evaluate.py`` for the tolerance).

Layout written by :func:`save_slorb_adapter` (``ast_core.export.export_hf`` puts
it in ``<export>/adapter/``): ``adapter_config.json`` + ``adapter_model.safetensors``
(what ``peft`` reads) and ``slorb.json`` (which base it belongs to: the sha256 of
the base's safetensors files, checked by :func:`check_adapter`).

:func:`load_exported` is the stock path and nothing more:
``AutoModelForCausalLM.from_pretrained(base)`` then, with an adapter,
``PeftModel.from_pretrained(model, adapter)``; before that it refuses an adapter
that is broken or belongs to another base, with a message that says which.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .errors import ASTError
from .slorb import SLoRB, group_sum_matrix

ADAPTER_DIR = "adapter"
ADAPTER_META = "slorb.json"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


class AdapterError(ASTError, ValueError):
    """An adapter that cannot be written or loaded as asked; the message names the file or layer."""


def base_fingerprint(files: list[Path]) -> str:
    """sha256 over the bytes of a checkpoint's safetensors files (in the given order)."""
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def lora_tensors(name: str, side: SLoRB) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lora_A, lora_B)`` = ``(X, S)`` of one branch: ``[r, in]`` and ``[out, r]``."""
    s = side.S.detach()
    x = side.X.detach() if side.X is not None else group_sum_matrix(side.in_features, side.group_size,
                                                                     dtype=s.dtype, device=s.device)
    return x.contiguous(), s.contiguous()


def _patterns(ranks: dict[str, int]) -> tuple[int, dict[str, int]]:
    """The default rank and the per-module exceptions, as PEFT patterns.

    An exception is written as the module's last name component (``down_proj``)
    when every targeted module of that name has the same rank, else as the
    escaped full name. PEFT matches a pattern ``p`` against ``(.*\\.)?(p)$``.
    """
    default = Counter(ranks.values()).most_common(1)[0][0]
    by_leaf: dict[str, set[int]] = {}
    for name, r in ranks.items():
        by_leaf.setdefault(name.rsplit(".", 1)[-1], set()).add(r)
    pattern: dict[str, int] = {}
    for name, r in ranks.items():
        if r == default:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if len(by_leaf[leaf]) == 1:
            pattern[leaf] = r
        else:
            pattern[re.escape(name)] = r
    return default, pattern


def lora_config(branches: list[tuple[str, SLoRB]], fan_in_fan_out: bool, base_path: str):
    """The ``peft.LoraConfig`` that reproduces ``branches`` exactly (scaling 1 everywhere)."""
    from peft import LoraConfig

    ranks = {name: side.in_features // side.group_size for name, side in branches}
    r, pattern = _patterns(ranks)
    return LoraConfig(r=r, lora_alpha=r, rank_pattern=dict(pattern), alpha_pattern=dict(pattern),
                      target_modules=sorted(ranks), lora_dropout=0.0, bias="none", use_rslora=False,
                      fan_in_fan_out=fan_in_fan_out, init_lora_weights=False, task_type="CAUSAL_LM",
                      base_model_name_or_path=base_path)


def save_slorb_adapter(base: nn.Module, branches: list[tuple[str, SLoRB]], out_dir: Path,
                       base_files: list[Path], base_path: str, fan_in_fan_out: bool = False) -> dict:
    """Write ``branches`` as a PEFT LoRA adapter for ``base`` (the exported plain model) into ``out_dir``.

    ``base`` is wrapped in place by PEFT (pass a copy you no longer need). The
    adapter is built and saved by PEFT itself, so its files are exactly what
    ``PeftModel.from_pretrained`` expects. ``slorb.json`` records the base's
    fingerprint. Returns that record.
    """
    from peft import get_peft_model

    if not branches:
        raise AdapterError("no SLoRB branches to export")
    cfg = lora_config(branches, fan_in_fan_out, base_path)
    base.name_or_path = base_path  # PEFT copies it into the config's base_model_name_or_path
    peft_model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, side in branches:
            a, b = lora_tensors(name, side)
            layer = peft_model.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
            if layer.scaling["default"] != 1.0:
                raise AdapterError(f"{name}: LoRA scaling is {layer.scaling['default']}, expected 1")
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out_dir), save_embedding_layers=False)  # SLoRB touches no embedding
    meta = {"format_version": 1, "method": "SLoRB (AST-Boosted) as LoRA: lora_A = X, lora_B = S, scaling 1",
            "base_sha256": base_fingerprint(base_files),
            "layers": {name: {"group_size": side.group_size, "rank": side.in_features // side.group_size,
                              "trainable_projection": side.X is not None} for name, side in branches}}
    (out_dir / ADAPTER_META).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return meta


def check_adapter(base_dir: str | Path, adapter_dir: str | Path) -> dict:
    """Refuse an adapter that stock PEFT would load wrongly or not at all; returns its ``adapter_config``.

    Checks, each with a message naming the file and what is wrong: the files
    exist and parse; for a LoRA adapter (other kinds are left to PEFT): when ``slorb.json`` is there (a
    SLoRB adapter: LoRA with scaling 1), the
    base's safetensors files have the recorded sha256 (an adapter exported for
    another base is refused even when every shape fits); ``target_modules``
    (PEFT's matching rule) names linear layers of the base, each has both tensors
    (PEFT would silently keep a freshly initialised one), and their shapes are
    the ones the config implies (``lora_A [r, in]``, ``lora_B [out, r]``).
    """
    from .export import _checkpoint_files  # the base's own safetensors files

    base, adapter = Path(base_dir), Path(adapter_dir)
    if not (adapter / PEFT_CONFIG).is_file():
        raise AdapterError(f"{adapter}: no {PEFT_CONFIG}; not a PEFT adapter directory")
    try:
        config = json.loads((adapter / PEFT_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise AdapterError(f"{adapter / PEFT_CONFIG}: unreadable ({err})") from err
    ours = (adapter / ADAPTER_META).is_file()  # a SLoRB adapter of an export (else any PEFT adapter)
    if config.get("peft_type") != "LORA":
        if ours:
            raise AdapterError(f"{adapter / PEFT_CONFIG}: peft_type {config.get('peft_type')!r}, expected 'LORA'")
        return config  # another kind of adapter: PEFT's own checks apply
    if not (adapter / PEFT_WEIGHTS).is_file():
        raise AdapterError(f"{adapter}: no {PEFT_WEIGHTS}")
    try:
        with safe_open(str(adapter / PEFT_WEIGHTS), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise AdapterError(f"{adapter / PEFT_WEIGHTS}: not a readable safetensors file ({err})") from err
    meta_file = adapter / ADAPTER_META
    if meta_file.is_file():
        try:
            want = json.loads(meta_file.read_text())["base_sha256"]
        except (OSError, json.JSONDecodeError, KeyError) as err:
            raise AdapterError(f"{meta_file}: unreadable or without base_sha256 ({err})") from err
        have = base_fingerprint(_checkpoint_files(base))
        if have != want:
            raise AdapterError(f"{adapter} was exported for another base model (base sha256 {want[:12]}…, "
                               f"{base} has {have[:12]}…); load it with the base it was exported beside")
    base_shapes = _base_linear_shapes(base)
    r_default, alpha_default = config.get("r"), config.get("lora_alpha")
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    fan = bool(config.get("fan_in_fan_out"))
    problems = []
    targets = _targeted(config.get("target_modules"), base_shapes)
    if not targets:
        problems.append(f"target_modules {config.get('target_modules')!r} match no linear layer of the base")
    for name in targets:
        out_f, in_f = base_shapes[f"{name}.weight"][::-1] if fan else base_shapes[f"{name}.weight"]
        r = _pattern_value(rank_pattern, name, r_default)
        if ours and _pattern_value(alpha_pattern, name, alpha_default) != r:
            problems.append(f"{name}: lora_alpha != r (scaling must be 1 for SLoRB)")
        for key, shape in ((f"base_model.model.{name}.lora_A.weight", (r, in_f)),
                           (f"base_model.model.{name}.lora_B.weight", (out_f, r))):
            if key not in shapes:
                problems.append(f"{key} missing")
            elif shapes[key] != shape:
                problems.append(f"{key} has shape {list(shapes[key])}, the base needs {list(shape)}")
    wanted = {f"base_model.model.{t}.lora_{ab}.weight" for t in targets for ab in "AB"}
    extra = sorted(set(shapes) - wanted)
    if extra:
        problems.append(f"tensors for no targeted module: {', '.join(extra[:5])}")
    if problems:
        raise AdapterError(f"{adapter} does not fit {base}: " + "; ".join(problems[:8])
                           + (f" (+{len(problems) - 8} more)" if len(problems) > 8 else ""))
    return config


def _targeted(target_modules, base_shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """The base's 2-D weights' modules that PEFT would adapt (its own matching rule).

    A list names modules by full name or by suffix (``key == t`` or ``key.endswith("." + t)``;
    PEFT shortens a long list of full names to their common suffixes when it saves); a
    string is a regex that must match the whole module name.
    """
    modules = sorted(k[: -len(".weight")] for k, v in base_shapes.items() if len(v) == 2)
    if isinstance(target_modules, str):
        return [k for k in modules if re.fullmatch(target_modules, k)]
    targets = list(target_modules or [])
    return [k for k in modules if any(k == t or k.endswith(f".{t}") for t in targets)]


def _pattern_value(patterns: dict[str, int], name: str, default):
    for key, value in patterns.items():  # PEFT's own rule (peft.utils.other.get_pattern_key)
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _base_linear_shapes(base: Path) -> dict[str, tuple[int, ...]]:
    from .export import _checkpoint_files
    out: dict[str, tuple[int, ...]] = {}
    for file in _checkpoint_files(base):
        with safe_open(str(file), framework="pt") as f:
            for k in f.keys():
                if k.endswith(".weight"):
                    out[k] = tuple(f.get_slice(k).get_shape())
    return out


def load_exported(base_dir: str | Path, adapter_dir: str | Path | None = None,
                  dtype: torch.dtype | None = None) -> nn.Module:
    """The stock load: ``AutoModelForCausalLM.from_pretrained(base)`` (+ ``PeftModel.from_pretrained``).

    Exactly what a user of the export runs (no project module takes part in the
    forward pass); the adapter is checked first (:func:`check_adapter`). Eval mode.
    """
    from transformers import AutoModelForCausalLM

    if adapter_dir is not None:
        check_adapter(base_dir, adapter_dir)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), **({"dtype": dtype} if dtype is not None else {}))
    if adapter_dir is not None:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    return model
