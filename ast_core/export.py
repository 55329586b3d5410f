"""Export a 2:4 model as a stock Hugging Face checkpoint, and verify one.

The contract (torchao-like): *dense weights with zeros are the hand-off*. The
exported directory loads with plain ``AutoModelForCausalLM.from_pretrained``
and no project code; every sparse weight in it is exactly N:M, so any backend
(the compressed format, cuSPARSELt) can accelerate it without changing the
model.

Files beside the stock checkpoint:

- ``sparsity.json`` — pattern, the sparse tensor names *as saved* (with their
  module name, shape and whether they are GPT-2 ``Conv1D`` weights stored
  transposed ``[in, out]``), and how SLoRB was handled.
- ``masks.safetensors`` — the N:M masks, one bit per weight (``[out, ceil(in/8)]``
  uint8, ``[out, in]`` layout). A kept weight can be exactly 0.0, so the
  non-zero pattern alone does not determine the mask; :func:`load_sparse`
  (the trainable sparse model of an export) uses these.
- ``README.md`` — the model card (``tasks/model_card.py`` writes the full one
  with measured numbers; without one, a short note on how to load).
- with an unfoldable SLoRB branch: ``adapter/``, a stock PEFT LoRA adapter
  (``ast_core.adapter``: ``lora_A = X``, ``lora_B = S``, scaling 1), so
  ``PeftModel.from_pretrained(base, "<export>/adapter")`` is the boosted model
  and the stock load alone is the 2:4 base without SLoRB.

SLoRB: ``W ⊙ m + S·X`` is N:M only when ``S`` vanishes on the pruned slots
(``ast_core.slorb.fold_is_exact``). ``slorb="auto"`` folds when that holds for
every layer and otherwise exports the branch as the adapter.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .compressed import pack_bits, unpack_bits
from .masks import NMReport, check_weights, magnitude_score, nm_mask
from .adapter import ADAPTER_DIR, check_adapter, save_slorb_adapter
from .slorb import fold_is_exact, folded_weight, slorb_layers
from .sparse import SparseLinear, densify, sparse_layers
from .errors import ASTError

SPARSITY_FILE = "sparsity.json"
MASKS_FILE = "masks.safetensors"
SIDE_FILES = {MASKS_FILE, "compressed.safetensors"}

# Fallback when an exported dir has no sparsity.json: (regex, stored transposed?)
DEFAULT_PATTERNS: list[tuple[str, bool]] = [
    (r"(^|\.)layers\.\d+\.(self_attn|mlp)\.\w*_proj\.weight$", False),  # LLaMA/Qwen/Mistral/OPT attn
    (r"(^|\.)layers\.\d+\.(fc1|fc2)\.weight$", False),  # OPT MLP
    (r"(^|\.)h\.\d+\.(attn|mlp)\.c_\w+\.weight$", True),  # GPT-2 Conv1D: [in, out]
]
_CONV1D_NAME = re.compile(DEFAULT_PATTERNS[2][0])


class ExportError(ASTError, ValueError):
    """An export that would break the contract; the message names the layer or file."""


def verify_model(model: nn.Module, n: int = 2, m: int = 4) -> NMReport:
    """Check every ``SparseLinear`` effective weight ``W ⊙ m`` for the N:M pattern."""
    return check_weights({name: layer.effective_weight() for name, layer in sparse_layers(model)}, n, m)


def _checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        return [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    files = [path / "model.safetensors"] if (path / "model.safetensors").exists() else \
        sorted(p for p in path.glob("*.safetensors") if p.name not in SIDE_FILES)
    if not files:
        raise ExportError(f"{path}: no safetensors checkpoint found")
    return files


def _checkpoint_keys(path: Path) -> list[str]:
    keys: list[str] = []
    for file in _checkpoint_files(path):
        with safe_open(str(file), framework="pt") as f:
            keys.extend(f.keys())
    return keys


def _read_tensors(path: Path, wanted: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a saved checkpoint by name (all, or those in ``wanted``), without a model."""
    want = None if wanted is None else set(wanted)
    out: dict[str, torch.Tensor] = {}
    for file in _checkpoint_files(path):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if want is None or key in want:
                    out[key] = f.get_tensor(key)
    return out


def _sparse_targets(path: Path, layer_patterns: list[str] | None) -> dict[str, bool]:
    """{tensor name: stored transposed?} from sparsity.json, explicit patterns, or the defaults."""
    if layer_patterns is None and (path / SPARSITY_FILE).exists():
        info = json.loads((path / SPARSITY_FILE).read_text())
        return {k: bool(v["conv1d"]) for k, v in info["sparse_tensors"].items()}
    names = _checkpoint_keys(path)
    if layer_patterns is not None:
        pats = [re.compile(p) for p in layer_patterns]
        return {k: bool(_CONV1D_NAME.search(k)) for k in names if any(p.search(k) for p in pats)}
    return {k: conv for k in names for pat, conv in DEFAULT_PATTERNS if re.search(pat, k)}


def verify_hf_dir(path: str | Path, n: int = 2, m: int = 4, layer_patterns: list[str] | None = None) -> NMReport:
    """Check every sparse tensor of an exported checkpoint, reading safetensors only.

    Which tensors are sparse comes from ``sparsity.json`` (and whether each is a
    Conv1D weight stored ``[in, out]``, transposed back before grouping the
    input columns); ``layer_patterns`` (regexes) overrides it; without either,
    the block linears are found by name (LLaMA-style ``layers.N.(self_attn|mlp).*_proj``,
    OPT ``fc1/fc2``, GPT-2 ``h.N.(attn|mlp).c_*``). A listed tensor missing
    from the files raises :class:`ExportError`.
    """
    p = Path(path)
    targets = _sparse_targets(p, layer_patterns)
    tensors = _read_tensors(p, targets)
    missing = sorted(set(targets) - set(tensors))
    if missing:
        raise ExportError(f"{p}: sparse tensors listed but not in the checkpoint: {', '.join(missing[:10])}")
    return check_weights({k: tensors[k].t() if targets[k] else tensors[k] for k in targets}, n, m)


def _fold_slorb(model: nn.Module) -> None:
    """Replace each branch by its fold ``W ⊙ m + S·X`` (caller checked it is N:M)."""
    for _, layer, _side in slorb_layers(model):
        w = folded_weight(layer)
        outside = (w != 0) & ~layer.mask
        mask = nm_mask(magnitude_score(w), layer.n, layer.m) if outside.any() else layer.mask.clone()
        layer.side = None
        layer.weight.data.copy_(w)
        layer.set_mask(mask)


README_NOTE = """# {n}:{m} sparse model

`AutoModelForCausalLM.from_pretrained("{name}")` loads the {n}:{m} sparse model{base_note}.
{adapter_note}
`sparsity.json` lists the sparse tensors; `{masks}` holds their masks.
"""

ADAPTER_NOTE = """
The SLoRB branch (`y += S·(X·x)`, a LoRA update with `lora_A = X`, `lora_B = S`,
scaling 1) cannot be folded into {n}:{m} weights, so it is a PEFT adapter in
`{adapter}/`. The boosted model (what was trained and evaluated):

```python
from transformers import AutoModelForCausalLM
from peft import PeftModel
base = AutoModelForCausalLM.from_pretrained("{name}")
model = PeftModel.from_pretrained(base, "{name}/{adapter}")
```
"""


def export_hf(model: nn.Module, tokenizer, out_dir: str | Path, n: int = 2, m: int = 4,
              slorb: str = "auto", card: str | None = None) -> dict:
    """Write a stock HF checkpoint of a sparsified model (dense weights with zeros).

    Refuses a model whose sparse weights are not N:M; a model without sparse
    layers (the dense baseline) is saved as is, with ``"pattern": "dense"``
    in ``sparsity.json``. Works on a deep copy:
    SLoRB is folded (``slorb="fold"``, or ``"auto"`` when every layer folds
    exactly) or written as a PEFT LoRA adapter in ``out_dir/adapter/``
    (``"adapter"``, or ``"auto"`` otherwise; ``ast_core.adapter``); then every ``SparseLinear`` becomes a plain layer holding
    ``W ⊙ m`` and the model is saved as safetensors (the only format of
    ``save_pretrained`` in transformers 5) with the tokenizer, ``sparsity.json``
    and the masks, and ``card`` (or a short loading note) as ``README.md``. The result is re-verified from disk, then moved into place
    atomically (written to a temp dir beside ``out_dir`` and renamed), so
    ``out_dir`` is either the old export or the complete new one.
    """
    if slorb not in ("auto", "fold", "adapter"):
        raise ValueError(f"slorb must be 'auto', 'fold' or 'adapter', got {slorb!r}")
    has_sparse = next(sparse_layers(model), None) is not None
    report = verify_model(model, n, m)
    if has_sparse and not report.ok:
        raise ExportError(f"refusing to export: {report}")
    branches = slorb_layers(model)
    unfoldable = [name for name, layer, _ in branches if not fold_is_exact(layer)]
    if slorb == "fold" and unfoldable:
        raise ExportError(f"SLoRB cannot be folded exactly into {n}:{m} weights for: {', '.join(unfoldable[:10])}")
    mode = "none" if not branches else ("adapter" if slorb == "adapter" or unfoldable else "folded")
    side_info: dict = {"mode": mode}
    if branches:
        first = branches[0][2]
        side_info.update(group_size=first.group_size, trainable_projection=first.trainable_projection,
                         layers={name: {"group_size": b.group_size, "trainable_projection": b.trainable_projection}
                                 for name, _, b in branches})

    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    work = copy.deepcopy(model)
    adapter_branches = []
    if mode == "folded":
        _fold_slorb(work)
    elif mode == "adapter":
        adapter_branches = [(name, side) for name, _, side in slorb_layers(work)]
        for _, layer, _ in slorb_layers(work):
            layer.side = None
    layers = dict(sparse_layers(work))
    masks = {name: pack_bits(layer.mask, 1).contiguous() for name, layer in layers.items()}
    sparse_tensors = {f"{name}.weight": {"module": name, "conv1d": bool(layer.from_conv1d),
                                         "shape": [layer.out_features, layer.in_features]}
                      for name, layer in layers.items()}
    densify(work)

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        work.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        absent = sorted(set(sparse_tensors) - set(_checkpoint_keys(tmp)))
        if absent:
            raise ExportError(f"saved checkpoint lacks the sparse tensors {absent[:5]} (renamed on save?)")
        if masks:
            save_file(masks, str(tmp / MASKS_FILE), metadata={"layout": "[out, ceil(in/8)] uint8, bit j of "
                                                                        "byte b = column 8b+j"})
        if mode == "adapter":
            conv1d = any(t["conv1d"] for t in sparse_tensors.values())
            meta = save_slorb_adapter(work, adapter_branches, tmp / ADAPTER_DIR, _checkpoint_files(tmp),
                                      base_path=str(out), fan_in_fan_out=conv1d)
            check_adapter(tmp, tmp / ADAPTER_DIR)
            side_info.update(adapter_dir=ADAPTER_DIR, base_sha256=meta["base_sha256"])
        if card is None:
            card = README_NOTE.format(
                name=out, n=n, m=m, masks=MASKS_FILE,
                base_note=" without SLoRB (the 2:4 base)" if mode == "adapter" else "",
                adapter_note=ADAPTER_NOTE.format(name=out, n=n, m=m, adapter=ADAPTER_DIR) if mode == "adapter" else "")
        (tmp / "README.md").write_text(card)
        info = {"format_version": 1, "pattern": f"{n}:{m}" if has_sparse else "dense", "n": n, "m": m,
                "layout_note": "conv1d tensors are stored [in, out]; groups run along the input dim",
                "sparse_tensors": sparse_tensors, "masks_file": MASKS_FILE, "slorb": side_info}
        (tmp / SPARSITY_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
        disk = verify_hf_dir(tmp, n, m)
        if has_sparse and not disk.ok:
            raise ExportError(f"exported checkpoint failed verification: {disk}")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out_dir": str(out), "pattern": info["pattern"], "sparse_tensors": len(sparse_tensors),
            "slorb": mode, "report": str(disk) if has_sparse else "dense model: nothing to verify",
            "files": sorted(p.name for p in out.iterdir())}


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; an existing ``dst`` is moved aside first and removed after."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(dst, old)
        os.rename(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(src, dst)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def load_sparse(path: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """The trainable 2:4 base of an export: stock load, then ``SparseLinear`` layers with the stored masks.

    Swaps the layers named in ``sparsity.json`` for ``SparseLinear`` and sets the
    stored masks (refusing a checkpoint with a non-zero weight outside its mask).
    The SLoRB adapter is not part of it: the boosted model for inference is
    ``ast_core.adapter.load_exported(path, path / "adapter")``, the stock PEFT load.
    """
    from transformers import AutoModelForCausalLM

    p = Path(path)
    info = json.loads((p / SPARSITY_FILE).read_text())
    n, m = info["n"], info["m"]
    model = AutoModelForCausalLM.from_pretrained(p, **({"dtype": dtype} if dtype is not None else {}))
    packed = load_file(str(p / info["masks_file"])) if info["sparse_tensors"] else {}
    for tensor_name, t in info["sparse_tensors"].items():
        name = t["module"]
        layer = SparseLinear.from_module(model.get_submodule(name), n, m)
        mask = unpack_bits(packed[name], 1, t["shape"][1]).to(torch.bool).to(layer.weight.device)
        if ((layer.weight.detach() != 0) & ~mask).any():
            raise ExportError(f"{tensor_name}: non-zero weights outside the stored mask")
        layer.set_mask(mask)
        _set_submodule(model, name, layer)
    model.eval()
    return model


def exported_adapter(path: str | Path) -> Path | None:
    """``path/adapter`` when the export holds its SLoRB as an adapter (``sparsity.json`` says so), else None."""
    p = Path(path)
    info = json.loads((p / SPARSITY_FILE).read_text()) if (p / SPARSITY_FILE).is_file() else {}
    side = info.get("slorb") or {}
    return p / side["adapter_dir"] if side.get("mode") == "adapter" else None
