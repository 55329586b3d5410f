"""Model specs: the embedded real model offline, tiny models deterministic, clear errors."""

from __future__ import annotations

import pytest
import torch

from ast_core.models import (ModelSpecError, check_same_tokenizer, load_model, load_tokenizer, resolve_spec,
                             tokenizer_fingerprint)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_tiny_models_are_deterministic_by_seed(arch: str) -> None:
    a, b, c = (load_model(f"tiny:{arch}", seed=s) for s in (3, 3, 4))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())
    ids = torch.randint(0, 1000, (1, 12))
    assert torch.equal(a(ids).logits, b(ids).logits)


def test_tiny_models_use_the_embedded_tokenizer() -> None:
    tok = load_tokenizer("tiny:llama")
    model = load_model("tiny:llama")
    assert model.config.vocab_size == len(tok) == 49152


@pytest.mark.parametrize("spec, needle", [
    ("tiny:mamba", "tiny:mamba"),
    ("embedded:gpt-5", "gpt-5"),
    ("./no/such/model", "./no/such/model"),
    ("/tmp/definitely-missing.gguf", "definitely-missing.gguf"),
])
def test_bad_specs_name_themselves(spec: str, needle: str) -> None:
    with pytest.raises(ModelSpecError, match=needle.replace(".", r"\.")):
        resolve_spec(spec)


def test_directory_without_config_is_refused(tmp_path) -> None:
    with pytest.raises(ModelSpecError, match="config.json"):
        resolve_spec(str(tmp_path))


def test_tokenizer_mismatch_is_refused() -> None:
    tok = load_tokenizer("tiny:llama")

    class Other:
        def get_vocab(self):
            return {"a": 0, "b": 1}

        def __len__(self):
            return 2

    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(load_tokenizer("embedded:smollm2-135m"))
    with pytest.raises(ModelSpecError, match="tokenizers differ"):
        check_same_tokenizer(tok, Other())


@pytest.mark.slow
@pytest.mark.ci
def test_embedded_model_loads_offline(smollm2, smollm2_tokenizer) -> None:
    cfg = smollm2.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == ("llama", 30, 576, 49152)
    ids = smollm2_tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        nxt = smollm2(ids).logits[0, -1].argmax()
    assert smollm2_tokenizer.decode(nxt).strip() == "Paris"


def test_the_suite_refuses_network_connections() -> None:
    """conftest blocks every non-loopback connection: a download attempt fails the test."""
    import socket

    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        with pytest.raises(RuntimeError, match="network connection"):
            s.connect(("93.184.216.34", 443))
    finally:
        s.close()


def test_random_specs_have_the_real_shapes_and_no_tokenizer() -> None:
    from ast_core.models import RANDOM_CONFIGS
    model = load_model("random:smollm2-135m", seed=3)
    n = sum(p.numel() for p in model.parameters())
    assert 134_000_000 < n < 135_000_000  # SmolLM2-135M: 134.5M parameters (tied embeddings)
    assert model.config.hidden_size == RANDOM_CONFIGS["smollm2-135m"]["hidden_size"] == 576
    again = load_model("random:smollm2-135m", seed=3)
    w = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(model.state_dict()[w], again.state_dict()[w])  # seeded
    with pytest.raises(ModelSpecError, match="only for timing"):
        load_tokenizer("random:smollm2-135m")
    with pytest.raises(ModelSpecError, match="random:llama-1.1b"):
        load_model("random:gpt5")
