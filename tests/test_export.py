"""HF export: stock load in a fresh process, verification from disk, SLoRB as a PEFT adapter, atomicity."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from ast_core.adapter import AdapterError, check_adapter, load_exported
from ast_core.export import ExportError, export_hf, exported_adapter, load_sparse, verify_hf_dir, verify_model
from ast_core.models import load_model, load_tokenizer
from ast_core.slorb import add_slorb, fold_is_exact, slorb_layers
from ast_core.sparse import SparseLinear, sparse_layers
from support import tiny

IDS = torch.tensor([[5, 17, 923, 4000, 12, 7, 301, 88, 2, 999, 45, 6]])

_BASE: dict[str, torch.nn.Module] = {}


def _sparse_model(spec: str) -> torch.nn.Module:
    if spec not in _BASE:
        _BASE[spec] = load_model(spec)
    return tiny.magnitude_sparse(copy.deepcopy(_BASE[spec]))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny:llama")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer) -> dict:
    """tiny:llama and tiny:gpt2 exported, and their logits from a fresh stock-transformers process."""
    root = tmp_path_factory.mktemp("export")
    out: dict = {}
    for arch in ("llama", "gpt2"):
        model = _sparse_model(f"tiny:{arch}")
        out[arch] = {"dir": root / arch, "logits": _logits(model), "model": model,
                     "result": export_hf(model, tokenizer, root / arch)}
    torch.save(IDS, root / "ids.pt")
    script = textwrap.dedent("""
        import sys, torch
        from transformers import AutoModelForCausalLM
        ids = torch.load(sys.argv[1] + "/ids.pt")
        for arch in ("llama", "gpt2"):
            model = AutoModelForCausalLM.from_pretrained(sys.argv[1] + "/" + arch).eval()
            with torch.no_grad():
                torch.save(model(ids).logits, sys.argv[1] + "/" + arch + "_logits.pt")
        assert not any(m.split(".")[0] == "ast_core" for m in sys.modules), "project code was imported"
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(root)], cwd=root, capture_output=True, text=True,
                          timeout=300, env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                                            "PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for arch in ("llama", "gpt2"):
        out[arch]["fresh_logits"] = torch.load(root / f"{arch}_logits.pt")
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_stock_load_in_fresh_process_reproduces_in_memory_logits(exported: dict, arch: str) -> None:
    e = exported[arch]
    assert e["result"]["slorb"] == "none" and e["result"]["sparse_tensors"] == (14 if arch == "llama" else 8)
    torch.testing.assert_close(e["fresh_logits"], e["logits"], rtol=1e-6, atol=1e-6)


def test_sparsity_json_records_names_as_saved_and_conv1d_flags(exported: dict) -> None:
    for arch, conv in (("llama", False), ("gpt2", True)):
        info = json.loads((exported[arch]["dir"] / "sparsity.json").read_text())
        saved = load_file(str(exported[arch]["dir"] / "model.safetensors"))
        assert info["pattern"] == "2:4" and info["slorb"]["mode"] == "none"
        assert set(info["sparse_tensors"]) <= set(saved)
        assert {v["conv1d"] for v in info["sparse_tensors"].values()} == {conv}
        for name, t in info["sparse_tensors"].items():
            expected = t["shape"][::-1] if conv else t["shape"]  # Conv1D is stored [in, out]
            assert list(saved[name].shape) == expected


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_verify_hf_dir_passes_on_export(exported: dict, arch: str) -> None:
    report = verify_hf_dir(exported[arch]["dir"])
    assert report.ok and len(report.checked) == exported[arch]["result"]["sparse_tensors"]


def test_verify_hf_dir_fails_on_one_corrupted_group_naming_the_tensor(exported: dict, tmp_path: Path) -> None:
    d = tmp_path / "corrupt"
    shutil.copytree(exported["llama"]["dir"], d)
    tensors = load_file(str(d / "model.safetensors"))
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name][3, 8:12] = torch.tensor([0.5, -0.25, 0.125, 0.0])  # 3 non-zeros in one group
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    report = verify_hf_dir(d)
    assert not report.ok
    assert report.offending == {name: 1}
    assert name in str(report)


def test_verify_hf_dir_checks_gpt2_groups_along_the_input_dim(exported: dict, tmp_path: Path) -> None:
    d = tmp_path / "gpt2"
    shutil.copytree(exported["gpt2"]["dir"], d)
    tensors = load_file(str(d / "model.safetensors"))
    name = "transformer.h.0.mlp.c_fc.weight"  # stored [in, out]
    tensors[name][4:8, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0])  # one input group of output 0
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    assert verify_hf_dir(d).offending == {name: 1}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_verify_hf_dir_without_sparsity_json_finds_the_same_tensors_by_name(exported: dict, arch: str,
                                                                           tmp_path: Path) -> None:
    d = tmp_path / arch
    shutil.copytree(exported[arch]["dir"], d)
    listed = set(json.loads((d / "sparsity.json").read_text())["sparse_tensors"])
    (d / "sparsity.json").unlink()
    report = verify_hf_dir(d)
    assert report.ok and set(report.checked) == listed
    only_q = verify_hf_dir(d, layer_patterns=[r"q_proj\.weight$"]) if arch == "llama" else None
    if only_q is not None:
        assert only_q.ok and len(only_q.checked) == 2


def test_export_refuses_a_model_that_is_not_24(tmp_path: Path, tokenizer) -> None:
    model = _sparse_model("tiny:llama")
    name, layer = next(iter(sparse_layers(model)))
    layer.mask[0, :4] = True
    with pytest.raises(ExportError, match=name):
        export_hf(model, tokenizer, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not verify_model(model).ok


def test_dense_model_exports_as_a_plain_checkpoint(tmp_path: Path) -> None:
    _sparse_model("tiny:llama")  # fills the cache
    dense = copy.deepcopy(_BASE["tiny:llama"])
    result = export_hf(dense, None, tmp_path / "dense")
    assert result["pattern"] == "dense" and result["sparse_tensors"] == 0
    assert not (tmp_path / "dense" / "masks.safetensors").exists()
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    torch.testing.assert_close(_logits(stock), _logits(dense), rtol=0, atol=0)
    assert not verify_hf_dir(tmp_path / "dense").ok  # nothing sparse to vouch for


def test_export_replaces_a_previous_export_and_leaves_no_temp_dirs(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first, second = _sparse_model("tiny:llama"), _sparse_model("tiny:llama")
    with torch.no_grad():
        for _, layer in sparse_layers(second):
            layer.weight.mul_(2)
    export_hf(first, None, out)
    export_hf(second, None, out)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    stock = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(_logits(stock), _logits(second), rtol=0, atol=0)


def test_failed_export_keeps_the_previous_one_intact(tmp_path: Path) -> None:
    out = tmp_path / "out"
    model = _sparse_model("tiny:llama")
    export_hf(model, None, out)
    before = sorted(p.name for p in out.iterdir())

    class BrokenTokenizer:
        def save_pretrained(self, path):  # type: ignore[no-untyped-def]
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        export_hf(model, BrokenTokenizer(), out)
    assert sorted(p.name for p in out.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_unfoldable_slorb_is_exported_as_a_peft_adapter_and_rebuilt_by_stock_peft(tmp_path: Path, tokenizer) -> None:
    model = _sparse_model("tiny:llama")
    add_slorb(model, 16)  # mean init: S ≠ 0, so folding would fill the pruned slots
    assert not any(fold_is_exact(layer) for _, layer, _ in slorb_layers(model))
    boosted = _logits(model)
    result = export_hf(model, tokenizer, tmp_path / "boosted")
    d = Path(result["out_dir"])
    assert result["slorb"] == "adapter" and exported_adapter(d) == d / "adapter"
    assert sorted(p.name for p in (d / "adapter").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "slorb.json"]
    config = json.loads((d / "adapter" / "adapter_config.json").read_text())
    # tiny:llama: hidden 64 -> r = 4 (k = 16); down_proj reads the 128-wide MLP -> r = 8; scaling 1 everywhere
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == 4
    assert config["rank_pattern"] == config["alpha_pattern"] == {"down_proj": 8}
    assert len(config["target_modules"]) == 14 and config["lora_dropout"] == 0.0
    tensors = load_file(str(d / "adapter" / "adapter_model.safetensors"))
    name, layer, side = slorb_layers(model)[0]
    assert torch.equal(tensors[f"base_model.model.{name}.lora_B.weight"], side.S.detach())
    assert set(tensors[f"base_model.model.{name}.lora_A.weight"].unique().tolist()) == {0.0, 1.0}
    readme = (d / "README.md").read_text()
    assert "WITHOUT" not in readme and "PeftModel.from_pretrained" in readme and "without SLoRB" in readme

    stock = AutoModelForCausalLM.from_pretrained(d)  # the 2:4 base only
    plain = copy.deepcopy(model)
    for _, layer, _ in slorb_layers(plain):
        layer.side = None
    torch.testing.assert_close(_logits(stock), _logits(plain), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(_logits(stock), boosted, atol=1e-4)

    rebuilt = load_exported(d, d / "adapter")  # AutoModelForCausalLM + PeftModel.from_pretrained
    assert type(rebuilt).__name__ == "PeftModelForCausalLM"
    torch.testing.assert_close(_logits(rebuilt), boosted, rtol=1e-5, atol=1e-5)
    assert verify_hf_dir(d).ok


def test_adapter_of_another_base_or_broken_is_refused_naming_the_cause(tmp_path: Path, tokenizer) -> None:
    one, two = _sparse_model("tiny:llama"), _sparse_model("tiny:llama")
    with torch.no_grad():
        for _, layer in sparse_layers(two):
            layer.weight.mul_(1.5)
    for model in (one, two):
        add_slorb(model, 16)
    a = Path(export_hf(one, None, tmp_path / "a")["out_dir"])
    b = Path(export_hf(two, None, tmp_path / "b")["out_dir"])
    check_adapter(a, a / "adapter")
    with pytest.raises(AdapterError, match="exported for another base"):
        load_exported(b, a / "adapter")  # same shapes, wrong base: stock PEFT would load it silently

    shutil.copytree(a, tmp_path / "shape")  # an adapter whose tensors do not fit the base
    t = load_file(str(tmp_path / "shape" / "adapter" / "adapter_model.safetensors"))
    key = next(k for k in t if k.endswith("q_proj.lora_B.weight"))
    t[key] = t[key][:, :2].contiguous()
    save_file(t, str(tmp_path / "shape" / "adapter" / "adapter_model.safetensors"))
    (tmp_path / "shape" / "adapter" / "slorb.json").unlink()  # no fingerprint: the shape check must catch it
    with pytest.raises(AdapterError, match=r"q_proj\.lora_B\.weight has shape \[64, 2\], the base needs \[64, 4\]"):
        check_adapter(tmp_path / "shape", tmp_path / "shape" / "adapter")

    # PEFT saves a long list of targets (more than 20 modules, e.g. SmolLM2's 210) as their common
    # suffixes; the check follows PEFT's rule, and a module matched without tensors is refused
    shutil.copytree(a, tmp_path / "suffix")
    cfg_file = tmp_path / "suffix" / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["target_modules"] = sorted({t.rsplit(".", 1)[-1] for t in cfg["target_modules"]})
    cfg_file.write_text(json.dumps(cfg))
    check_adapter(tmp_path / "suffix", tmp_path / "suffix" / "adapter")
    torch.testing.assert_close(_logits(load_exported(tmp_path / "suffix", tmp_path / "suffix" / "adapter")),
                               _logits(load_exported(a, a / "adapter")), rtol=0, atol=0)
    t = load_file(str(tmp_path / "suffix" / "adapter" / "adapter_model.safetensors"))
    save_file({k: v for k, v in t.items() if ".layers.1.mlp.up_proj." not in k},
              str(tmp_path / "suffix" / "adapter" / "adapter_model.safetensors"))
    (tmp_path / "suffix" / "adapter" / "slorb.json").unlink()
    with pytest.raises(AdapterError, match=r"layers\.1\.mlp\.up_proj\.lora_A\.weight missing"):
        check_adapter(tmp_path / "suffix", tmp_path / "suffix" / "adapter")

    shutil.copytree(a, tmp_path / "trunc")
    f = tmp_path / "trunc" / "adapter" / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        load_exported(tmp_path / "trunc", tmp_path / "trunc" / "adapter")
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        check_adapter(a, tmp_path / "nowhere")


def test_foldable_slorb_is_folded_into_the_stock_checkpoint(tmp_path: Path) -> None:
    model = _sparse_model("tiny:gpt2")
    add_slorb(model, 16)
    with torch.no_grad():
        for _, _, side in slorb_layers(model):
            side.S.zero_()
    result = export_hf(model, None, tmp_path / "folded")
    d = Path(result["out_dir"])
    assert result["slorb"] == "folded"
    assert not (d / "adapter").exists() and "PeftModel" not in (d / "README.md").read_text()
    stock = AutoModelForCausalLM.from_pretrained(d)
    torch.testing.assert_close(_logits(stock), _logits(model), rtol=1e-6, atol=1e-6)


def test_fold_mode_refuses_unfoldable_slorb_naming_the_layer(tmp_path: Path) -> None:
    model = _sparse_model("tiny:llama")
    add_slorb(model, 16)
    with pytest.raises(ExportError, match=r"model\.layers\.0\.self_attn\.q_proj"):
        export_hf(model, None, tmp_path / "x", slorb="fold")


def test_load_sparse_uses_stored_masks_when_a_kept_weight_is_zero(tmp_path: Path) -> None:
    model = _sparse_model("tiny:gpt2")
    name, layer = next(iter(sparse_layers(model)))
    kept = layer.mask.nonzero()[0]
    with torch.no_grad():
        layer.weight[kept[0], kept[1]] = 0.0  # the non-zero pattern no longer shows this kept slot
    export_hf(model, None, tmp_path / "z")
    rebuilt = load_sparse(tmp_path / "z")
    got = rebuilt.get_submodule(name)
    assert isinstance(got, SparseLinear) and got.from_conv1d
    for (n1, a), (n2, b) in zip(sparse_layers(model), sparse_layers(rebuilt)):
        assert n1 == n2 and torch.equal(a.mask, b.mask)
    torch.testing.assert_close(_logits(rebuilt), _logits(model), rtol=1e-6, atol=1e-6)


def test_a_trainable_projection_and_other_group_size_export_as_lora_a(tmp_path: Path) -> None:
    model = _sparse_model("tiny:gpt2")
    add_slorb(model, 8, trainable_projection=True)
    with torch.no_grad():
        first = slorb_layers(model)[0][2]
        first.X.add_(0.01)  # no longer a 0/1 group-sum: only the stored X reproduces it
    export_hf(model, None, tmp_path / "x")
    info = json.loads((tmp_path / "x" / "sparsity.json").read_text())["slorb"]
    assert info["mode"] == "adapter" and all(v == {"group_size": 8, "trainable_projection": True}
                                             for v in info["layers"].values())
    config = json.loads((tmp_path / "x" / "adapter" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True  # GPT-2 Conv1D
    rebuilt = load_exported(tmp_path / "x", tmp_path / "x" / "adapter")
    torch.testing.assert_close(_logits(rebuilt), _logits(model), rtol=1e-6, atol=1e-6)
