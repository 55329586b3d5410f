"""A compressed N:M checkpoint: kept values + packed position metadata.

For a 2:4 weight ``[out, in]`` each group of 4 consecutive input columns holds
at most 2 non-zeros. The format stores, per group, exactly ``n`` values (in the
weight's dtype) and the ``n`` positions inside the group they came from
(``ceil(log2 m)`` bits each, rounded up to 1/2/4/8 so positions pack evenly into
bytes; 2 bits for m=4, four positions per uint8). Bytes per dense element for a
16-bit weight: ``2·(n/m) + (n/m)·bits/8 = 1 + 0.125 = 1.125`` against 2 dense,
i.e. **0.5625×**.

Invariants (tested):

- ``decompress_nm(compress_nm(w))`` equals ``w`` bit for bit whenever every
  group holds at most ``n`` entries whose bit pattern is not ``+0.0`` (kept
  ``-0.0`` and NaN payloads survive: values are moved by gather/scatter, never
  by arithmetic). A group with fewer than ``n`` non-zeros stores explicit zeros.
- Every slot that is not stored decodes to ``+0.0``. ``W ⊙ m`` writes ``-0.0``
  at pruned slots of negative weights; those become ``+0.0``, numerically equal,
  so a model's outputs are unchanged (tested on logits).
- Positions come, in order of preference, from the layer's mask, then from the
  numerically non-zero entries, then from ``-0.0`` entries; so when the mask
  keeps exactly ``n`` per group the stored positions *are* the mask
  (:func:`kept_mask` gives it back) — no ambiguity when a kept weight is 0.0.
- A weight with more than ``n`` non-zeros in a group is refused, naming the
  first offending row and group.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import atomic_path, atomic_write_json
from .sparse import sparse_layers
from .errors import ASTError

FORMAT_VERSION = 1
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class CompressionError(ASTError, ValueError):
    """A weight that is not N:M (or metadata that is corrupt); the message says where."""


def position_bits(m: int) -> int:
    """Bits per stored position: ``ceil(log2 m)`` rounded up to a divisor of 8."""
    need = max(1, math.ceil(math.log2(m)))
    for bits in (1, 2, 4, 8):
        if need <= bits:
            return bits
    raise CompressionError(f"M={m} is too large for byte-packed positions (M ≤ 256)")


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack the last dim of small unsigned codes (< 2**bits) into uint8, little end first.

    The last dim is zero-padded to a multiple of ``8 // bits``; the caller
    records the true length.
    """
    per_byte = 8 // bits
    pad = (-codes.shape[-1]) % per_byte
    c = torch.nn.functional.pad(codes.to(torch.int32), (0, pad))
    c = c.unflatten(-1, (c.shape[-1] // per_byte, per_byte))
    shifts = torch.arange(per_byte, device=c.device, dtype=torch.int32) * bits
    return (c << shifts).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: int64 codes, last dim cut to ``length``."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.int32) * bits
    codes = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.flatten(-2)[..., :length].to(torch.int64)


def _bits_nonzero(t: torch.Tensor) -> torch.Tensor:
    """True where the bit pattern is not all zeros (so ``-0.0`` counts, ``+0.0`` does not)."""
    if t.dtype == torch.bool or not t.is_floating_point():
        return t != 0
    return t.view(_INT_VIEW[t.element_size()]) != 0


_LUT_LEVELS = 8  # priority values 0..7 (mask·4 + numeric·2 + bits-non-zero)


def _ranked_positions(priority: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The ``n`` slots of largest priority per group (ties → lower position), ascending."""
    order = torch.argsort(-priority.to(torch.int16), dim=-1, stable=True)[..., :n]
    return order.sort(dim=-1).values


@functools.lru_cache(maxsize=8)
def _selection_table(n: int, m: int) -> torch.Tensor:
    """For every combination of per-slot priorities (base-8 code), the chosen positions."""
    codes = torch.arange(_LUT_LEVELS ** m)
    digits = (codes.unsqueeze(-1) // _LUT_LEVELS ** torch.arange(m)) % _LUT_LEVELS
    return _ranked_positions(digits, n, m)


def _select_positions(priority: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """:func:`_ranked_positions`, through a lookup table for m ≤ 4 (a sort per group is slow)."""
    if m > 4:
        return _ranked_positions(priority, n, m)
    weights = _LUT_LEVELS ** torch.arange(m, device=priority.device, dtype=torch.int32)
    code = (priority.to(torch.int32) * weights).sum(-1)
    return _selection_table(n, m).to(priority.device)[code]


def compress_nm(weight: torch.Tensor, n: int = 2, m: int = 4,
                mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Compress an N:M weight ``[out, in]`` into ``values``, ``meta``, ``shape``, ``nm``.

    ``values`` is ``[out, G·n]`` in the weight's dtype (``G = ceil(in/m)`` groups,
    columns zero-padded to a multiple of m), ``meta`` is uint8 ``[out,
    ceil(G·n·bits/8)]`` of within-group positions (ascending per group),
    ``shape`` (int64) the original ``[out, in]`` and ``nm`` the pattern. An
    optional ``mask`` (bool, same shape) decides which slots are stored first.
    """
    if not 0 < n < m:
        raise CompressionError(f"N:M needs 0 < N < M, got {n}:{m}")
    if weight.dim() != 2:
        raise CompressionError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    bits = position_bits(m)
    pad = (-cols) % m
    w = torch.nn.functional.pad(weight.detach(), (0, pad)).contiguous()
    g = w.reshape(rows, -1, m)
    numeric = g != 0  # NaN counts as non-zero
    per_group = numeric.sum(-1)
    bad = per_group > n
    if bad.any():
        row, grp = (int(i) for i in bad.nonzero()[0])
        raise CompressionError(
            f"weight is not {n}:{m}: {int(bad.sum())} groups hold more than {n} non-zeros "
            f"(first: row {row}, columns {grp * m}..{grp * m + m - 1} hold {int(per_group[row, grp])})")
    priority = 2 * numeric.to(torch.int16) + _bits_nonzero(g).to(torch.int16)
    if mask is not None:
        if mask.shape != weight.shape:
            raise CompressionError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(weight.shape)}")
        mg = torch.nn.functional.pad(mask.to(torch.bool), (0, pad)).reshape(rows, -1, m)
        priority = priority + 4 * mg.to(torch.int16)
    idx = _select_positions(priority, n, m)  # [rows, G, n], ascending per group
    values = g.gather(-1, idx).reshape(rows, -1)
    meta = pack_bits(idx.reshape(rows, -1), bits)
    return {"values": values, "meta": meta,
            "shape": torch.tensor([rows, cols], dtype=torch.int64),
            "nm": torch.tensor([n, m], dtype=torch.int64)}


def _positions(packed: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, int, int, int]:
    """Unpacked positions ``[rows, G, n]`` with (rows, cols, n, m); checks them."""
    rows, cols = (int(v) for v in packed["shape"])
    n, m = (int(v) for v in packed["nm"])
    groups = -(-cols // m)
    if packed["values"].shape != (rows, groups * n):
        raise CompressionError(f"values shape {tuple(packed['values'].shape)} != ({rows}, {groups * n}) "
                               f"for a {n}:{m} weight of shape ({rows}, {cols})")
    idx = unpack_bits(packed["meta"], position_bits(m), groups * n).reshape(rows, groups, n)
    if (idx >= m).any() or (n > 1 and (idx[..., 1:] <= idx[..., :-1]).any()):
        raise CompressionError("corrupt metadata: positions must be < M and strictly increasing per group")
    return idx, rows, cols, n, m


def _scatter(idx: torch.Tensor, src: torch.Tensor, rows: int, cols: int, m: int) -> torch.Tensor:
    out = torch.zeros(rows, idx.shape[1], m, dtype=src.dtype, device=src.device)
    out.scatter_(-1, idx, src)
    return out.reshape(rows, -1)[:, :cols]


def decompress_nm(packed: dict[str, torch.Tensor]) -> torch.Tensor:
    """The dense ``[out, in]`` weight with zeros: stored values scattered back, ``+0.0`` elsewhere."""
    return decompress_with_mask(packed)[0]


def kept_mask(packed: dict[str, torch.Tensor]) -> torch.Tensor:
    """The bool mask of stored slots (exactly ``n`` per group): the layer mask when it was exact."""
    idx, rows, cols, n, m = _positions(packed)
    return _scatter(idx, torch.ones(idx.shape, dtype=torch.bool, device=idx.device), rows, cols, m)


def decompress_with_mask(packed: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(:func:`decompress_nm`, :func:`kept_mask`) unpacking the metadata once."""
    idx, rows, cols, n, m = _positions(packed)
    values = packed["values"].reshape(rows, -1, n)
    ones = torch.ones(idx.shape, dtype=torch.bool, device=idx.device)
    return _scatter(idx, values, rows, cols, m), _scatter(idx, ones, rows, cols, m)


def packed_bytes(packed: dict[str, torch.Tensor]) -> int:
    """Bytes of ``values`` + ``meta`` (the shape record is a few bytes of JSON)."""
    return sum(packed[k].numel() * packed[k].element_size() for k in ("values", "meta"))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _unique_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict without aliases (tied weights): unique tensors + {alias: kept name}."""
    seen: dict[tuple, str] = {}
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, t in model.state_dict(keep_vars=False).items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()), t.device)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = t.detach()
    return unique, aliases


def save_compressed(model: nn.Module, out_dir: str | Path, n: int = 2, m: int = 4) -> dict:
    """Write ``compressed.safetensors`` + ``compressed.json`` for a sparsified model.

    Every ``SparseLinear`` is stored as ``{name}.values`` / ``{name}.meta`` of its
    effective weight ``W ⊙ m`` (positions taken from its mask), plus its bias;
    every other tensor (embeddings, norms, LM head, SLoRB ``S``) is stored dense.
    Mask buffers are not stored: the positions are the mask. Tied weights are
    stored once and recorded as aliases. Files are written to temporaries and
    renamed, so a crash never leaves a half-written pair. Returns the byte report.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers = dict(sparse_layers(model))
    if not layers:
        raise CompressionError(f"{type(model).__name__} has no SparseLinear layers; sparsify it first")
    state, aliases = _unique_state(model)
    tensors: dict[str, torch.Tensor] = {}
    info: dict[str, dict] = {}
    skip = {f"{name}.{k}" for name in layers for k in ("weight", "mask")}
    sparse_bytes = dense_equiv = 0
    for name, layer in layers.items():
        w = layer.effective_weight()
        try:
            packed = compress_nm(w, n, m, mask=layer.mask)
        except CompressionError as err:
            raise CompressionError(f"{name}: {err}") from None
        tensors[f"{name}.values"] = packed["values"].contiguous()
        tensors[f"{name}.meta"] = packed["meta"].contiguous()
        info[name] = {"shape": list(w.shape), "dtype": str(w.dtype).removeprefix("torch."),
                      "from_conv1d": bool(layer.from_conv1d), "bytes": packed_bytes(packed),
                      "dense_bytes": _nbytes(w)}
        sparse_bytes += packed_bytes(packed)
        dense_equiv += _nbytes(w)
    dense_rest = 0
    for key, t in state.items():
        if key in skip:
            continue
        tensors[key] = t.contiguous()
        dense_rest += _nbytes(t)
    manifest = {
        "format_version": FORMAT_VERSION, "pattern": f"{n}:{m}", "n": n, "m": m,
        "position_bits": position_bits(m), "layers": info, "aliases": aliases,
        "dense_tensors": sorted(k for k in state if k not in skip),
        "bytes": {"sparse_linear_compressed": sparse_bytes, "sparse_linear_dense": dense_equiv,
                  "other_dense": dense_rest},
    }
    with atomic_path(out / "compressed.safetensors") as tmp:
        save_file(tensors, str(tmp))
    atomic_write_json(out / "compressed.json", manifest)
    return byte_report(out)


def load_compressed(out_dir: str | Path, layout: str = "sparse") -> dict[str, torch.Tensor]:
    """Rebuild the dense-with-zeros state dict from a :func:`save_compressed` directory.

    ``layout="sparse"``: keys of the sparsified model (``{name}.weight`` as
    ``[out, in]`` with zeros, ``{name}.mask`` from the stored positions, SLoRB
    tensors as saved) — ``load_state_dict`` into the same sparsified model.
    ``layout="hf"``: keys of the plain model (GPT-2 Conv1D weights transposed
    back to ``[in, out]``, no masks) — loads into a stock model; refused when
    SLoRB tensors are present, since the stock model has nowhere to put them.
    """
    if layout not in ("sparse", "hf"):
        raise ValueError(f"layout must be 'sparse' or 'hf', got {layout!r}")
    d = Path(out_dir)
    manifest = json.loads((d / "compressed.json").read_text())
    raw = load_file(str(d / "compressed.safetensors"))
    n, m = manifest["n"], manifest["m"]
    state: dict[str, torch.Tensor] = {}
    for name, info in manifest["layers"].items():
        packed = {"values": raw[f"{name}.values"], "meta": raw[f"{name}.meta"],
                  "shape": torch.tensor(info["shape"]), "nm": torch.tensor([n, m])}
        w, mask = decompress_with_mask(packed)
        if layout == "sparse":
            state[f"{name}.weight"] = w
            state[f"{name}.mask"] = mask
        else:
            state[f"{name}.weight"] = w.t().contiguous() if info["from_conv1d"] else w
    for key in manifest["dense_tensors"]:
        if layout == "hf" and ".side." in key:
            raise CompressionError(f"{key}: a SLoRB tensor has no place in the stock model; use layout='sparse'")
        state[key] = raw[key]
    for alias, target in manifest["aliases"].items():
        if alias.endswith(".mask"):
            continue
        state[alias] = state[target]
    return state


def byte_report(out_dir: str | Path) -> dict:
    """Bytes of a compressed directory against the dense checkpoint in the same dtypes.

    ``sparse_linear_ratio`` = (values + meta) / dense bytes of the sparse-linear
    weights (0.5625 for fp16/bf16 2:4, 0.53125 for fp32); ``checkpoint_ratio``
    adds every dense tensor to both sides; ``file_bytes`` is the size on disk.
    """
    d = Path(out_dir)
    b = json.loads((d / "compressed.json").read_text())["bytes"]
    comp = b["sparse_linear_compressed"] + b["other_dense"]
    dense = b["sparse_linear_dense"] + b["other_dense"]
    return {
        "sparse_linear_compressed_bytes": b["sparse_linear_compressed"],
        "sparse_linear_dense_bytes": b["sparse_linear_dense"],
        "sparse_linear_ratio": b["sparse_linear_compressed"] / max(b["sparse_linear_dense"], 1),
        "checkpoint_compressed_bytes": comp,
        "checkpoint_dense_bytes": dense,
        "checkpoint_ratio": comp / max(dense, 1),
        "file_bytes": (d / "compressed.safetensors").stat().st_size,
    }
