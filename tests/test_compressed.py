"""Compressed N:M format: bit-exact round trip, byte count, refusal, model save/load."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from ast_core.compressed import (CompressionError, _ranked_positions, _select_positions, byte_report, compress_nm,
                                 decompress_nm, kept_mask, load_compressed, pack_bits, save_compressed, unpack_bits)
from ast_core.masks import magnitude_score, nm_mask
from ast_core.models import load_model
from ast_core.slorb import add_slorb
from ast_core.sparse import sparse_layers
from support import tiny

_INT = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


def _random_24(rows: int, cols: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2:4 weight with awkward groups: kept -0.0, kept +0.0, groups with 0 or 1 non-zeros."""
    w = torch.randn(rows, cols).to(dtype)
    mask = nm_mask(torch.rand(rows, cols))
    w = torch.where(mask, w, torch.zeros((), dtype=dtype))  # +0.0 at pruned slots: bit-representable
    kept = mask.nonzero()
    w[kept[0, 0], kept[0, 1]] = -0.0
    w[kept[1, 0], kept[1, 1]] = 0.0
    w[1, 4:8] = torch.tensor([0.0, -0.0, 0.0, 0.0]).to(dtype)  # one non-+0 pattern (a -0.0)
    w[2, 0:4] = 0
    w[2, 1] = 3.5  # a single non-zero
    return w, mask


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("cols", [64, 20, 12])  # 20, 12: position count not a multiple of 4 (padding)
def test_roundtrip_is_bit_exact_including_signed_zeros(dtype: torch.dtype, cols: int) -> None:
    w, _ = _random_24(7, cols, dtype)
    packed = compress_nm(w)
    assert packed["values"].dtype == dtype and packed["values"].shape == (7, cols // 2)
    assert packed["meta"].dtype == torch.uint8 and packed["meta"].shape == (7, -(-cols // 8))
    back = decompress_nm(packed)
    assert back.dtype == dtype and back.shape == w.shape
    assert torch.equal(back.view(_INT[dtype]), w.view(_INT[dtype]))
    assert torch.signbit(back[1, 5])  # the lone -0.0 survived


def test_roundtrip_keeps_nan_payload_and_inf() -> None:
    w, _ = _random_24(4, 16, torch.float16)
    kept = (w != 0).nonzero()
    w.view(torch.int16)[kept[0, 0], kept[0, 1]] = 0x7E01  # a NaN with a non-default payload
    w[kept[1, 0], kept[1, 1]] = float("-inf")
    back = decompress_nm(compress_nm(w))
    assert torch.equal(back.view(torch.int16), w.view(torch.int16))


def test_stored_positions_follow_the_mask_even_for_kept_zeros() -> None:
    w = torch.randn(5, 16)
    mask = nm_mask(torch.rand(5, 16))
    w = w * mask
    w[0][mask[0]] = 0.0  # row 0: every kept weight is exactly zero
    packed = compress_nm(w, mask=mask)
    assert torch.equal(kept_mask(packed), mask)
    assert torch.equal(decompress_nm(packed), w)


def test_masked_weight_negative_zeros_at_pruned_slots_decode_equal() -> None:
    w = torch.randn(6, 32, dtype=torch.bfloat16)
    mask = nm_mask(magnitude_score(w))
    eff = w * mask  # negative pruned weights become -0.0
    assert torch.signbit(eff[~mask]).any()
    back = decompress_nm(compress_nm(eff, mask=mask))
    assert torch.equal(back, eff)  # numerically equal
    assert not torch.signbit(back[~mask]).any()  # pruned slots decode to +0.0


def test_compress_refuses_non_24_weight_naming_the_group() -> None:
    w, _ = _random_24(4, 16, torch.float32)
    w[3, 8:12] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    with pytest.raises(CompressionError, match=r"1 groups hold more than 2 non-zeros.*row 3, columns 8\.\.11"):
        compress_nm(w)


def test_decompress_rejects_corrupt_metadata() -> None:
    packed = compress_nm(_random_24(3, 16, torch.float16)[0])
    packed["meta"] = torch.zeros_like(packed["meta"])  # both positions 0 in every group
    with pytest.raises(CompressionError, match="strictly increasing"):
        decompress_nm(packed)


def test_lookup_table_selection_equals_stable_sort_selection() -> None:
    priority = torch.randint(0, 8, (200, 30, 4))
    assert torch.equal(_select_positions(priority, 2, 4), _ranked_positions(priority, 2, 4))
    assert torch.equal(_select_positions(priority, 1, 4), _ranked_positions(priority, 1, 4))


def test_general_nm_roundtrip_4_of_8_uses_3_bit_positions_packed_as_4() -> None:
    w = torch.randn(6, 40)
    w = w * nm_mask(magnitude_score(w), 4, 8)
    packed = compress_nm(w, 4, 8)
    assert packed["values"].shape == (6, 20) and packed["meta"].shape == (6, 10)  # 20 positions × 4 bits
    assert torch.equal(decompress_nm(packed), w)


def test_pack_bits_roundtrip_and_layout() -> None:
    codes = torch.tensor([[1, 2, 3, 0, 3]])
    packed = pack_bits(codes, 2)
    assert packed.tolist() == [[1 | 2 << 2 | 3 << 4, 3]]
    assert torch.equal(unpack_bits(packed, 2, 5), codes)


def test_fp16_byte_ratio_is_0_5625() -> None:
    w = torch.randn(64, 256, dtype=torch.float16)
    packed = compress_nm(w * nm_mask(magnitude_score(w)))
    size = sum(packed[k].numel() * packed[k].element_size() for k in ("values", "meta"))
    assert size / (w.numel() * 2) == pytest.approx(0.5625)


_BASE: dict[str, torch.nn.Module] = {}


def _plain_model(spec: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    """A tiny model (loaded once per spec: loading reads the tokenizer); other seeds get fresh weights."""
    if spec not in _BASE:
        _BASE[spec] = load_model(spec)
    model = copy.deepcopy(_BASE[spec])
    if seed:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.to(dtype)


def _sparse_model(spec: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    return tiny.magnitude_sparse(_plain_model(spec, dtype, seed))


def test_save_load_compressed_reproduces_logits_exactly(tmp_path) -> None:
    model = _sparse_model("tiny:llama")
    ids = torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        ref = model(ids).logits
    report = save_compressed(model, tmp_path)
    manifest = json.loads((tmp_path / "compressed.json").read_text())
    assert manifest["pattern"] == "2:4" and len(manifest["layers"]) == 14
    assert manifest["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}  # tied, stored once

    fresh = _sparse_model("tiny:llama", seed=1)  # different weights and masks
    fresh.load_state_dict(load_compressed(tmp_path), strict=True)
    for (_, a), (_, b) in zip(sparse_layers(model), sparse_layers(fresh)):
        assert torch.equal(a.mask, b.mask)
    stock = _plain_model("tiny:llama", seed=1)  # the plain architecture, no project layers
    stock.load_state_dict(load_compressed(tmp_path, layout="hf"), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, ref)
        assert torch.equal(stock(ids).logits, ref)
    assert report["sparse_linear_ratio"] == pytest.approx(2.125 / 4)  # fp32: 0.5·4 + 0.125 bytes per weight
    assert report["checkpoint_ratio"] < 1


def test_fp16_model_sparse_linear_bytes_at_most_0_5626_of_dense(tmp_path) -> None:
    report = save_compressed(_sparse_model("tiny:llama", dtype=torch.float16), tmp_path)
    assert report["sparse_linear_ratio"] <= 0.5626
    assert report["sparse_linear_dense_bytes"] == 2 * 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128)  # 2 layers, 2 bytes
    assert report["file_bytes"] >= report["checkpoint_compressed_bytes"]


def test_gpt2_conv1d_and_slorb_tensors_roundtrip(tmp_path) -> None:
    model = _sparse_model("tiny:gpt2")
    add_slorb(model, 16)
    ids = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        ref = model(ids).logits
    save_compressed(model, tmp_path)
    state = load_compressed(tmp_path)
    assert "transformer.h.0.attn.c_attn.side.S" in state
    fresh = _sparse_model("tiny:gpt2", seed=3)
    add_slorb(fresh, 16)
    fresh.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, ref)
    with pytest.raises(CompressionError, match="SLoRB tensor"):
        load_compressed(tmp_path, layout="hf")


def test_save_compressed_refuses_a_layer_that_is_not_24(tmp_path) -> None:
    model = _sparse_model("tiny:llama")
    name, layer = next(iter(sparse_layers(model)))
    layer.mask[0, :4] = True
    with pytest.raises(CompressionError, match=name):
        save_compressed(model, tmp_path)
    assert not (tmp_path / "compressed.json").exists()


def test_byte_report_reads_a_saved_directory(tmp_path) -> None:
    save_compressed(_sparse_model("tiny:llama", dtype=torch.bfloat16), tmp_path)
    r = byte_report(tmp_path)
    assert r["sparse_linear_ratio"] == pytest.approx(0.5625)
    assert r["checkpoint_compressed_bytes"] == r["sparse_linear_compressed_bytes"] + (
        r["checkpoint_dense_bytes"] - r["sparse_linear_dense_bytes"])
