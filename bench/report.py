"""Build ``docs/RESULTS.md`` from whatever the benchmarks left in ``bench/results`` (issue #6).

    python -m bench.report [--results bench/results] [--out docs/RESULTS.md] [--notes bench/notes]

Every section shows the command that produced it, the date of its stamp, its
table, its PNGs (relative links) and one verdict line per goal, computed from
the numbers ("met" / "missed"), followed by the hand-written explanation in
``bench/notes/<section>.md`` when there is one. A results file that is missing
or has an unexpected shape gives "not measured yet (run: ...)" instead of an
error: the report can be built at any time, also while benchmarks run.

Each section's renderer lives with its benchmark, ``bench/<module>.py``:
``render_body(data, image) -> Body`` (or the text), and optionally
``command_of(data)`` for results files that do not record their command. This
module keeps the section registry (:data:`SECTIONS`), the helpers the renderers
share (:class:`Verdict`, :class:`Body`, :func:`fmt`, :func:`stamp_line`, ...) and
the assembly. It imports no torch: a benchmark module is imported only when its
section is rendered (several import torch at module level), and the benchmark
scripts use the same renderers for their own ``.md`` files, so both read the same way.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]

from tasks.tables import markdown_table  # noqa: E402

RESULTS = REPO / "bench" / "results"
NOTES = REPO / "bench" / "notes"
OUT = REPO / "docs" / "RESULTS.md"


# ============================================================================ small helpers

@dataclass
class Verdict:
    """One goal checked against a number: ``met`` is None when the number is missing."""
    goal: str
    measured: str
    met: bool | None

    @property
    def word(self) -> str:
        return "not measured" if self.met is None else ("met" if self.met else "missed")

    def line(self) -> str:
        if self.met is None:
            return f"- **Goal: {self.goal} — not measured yet** ({self.measured})"
        return f"- **Goal: {self.goal} — {self.word}** (measured: {self.measured})"


@dataclass
class Body:
    """A rendered section body and the verdicts it computed."""
    text: str
    verdicts: list[Verdict] = field(default_factory=list)


def at_most(value: float | None, limit: float) -> bool | None:
    return None if value is None or not math.isfinite(value) else value <= limit + 1e-12


def fmt(v: Any, spec: str = ".2f", none: str = "—") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return none
    return format(v, spec)


def stamp_line(data: dict, path: Path | None = None) -> str:
    """"Measured <date> on <machine> ..." from the results' stamp; the file's time when there is none."""
    s = data.get("stamp") if isinstance(data, dict) else None
    if isinstance(s, dict) and s.get("date"):
        extra = ", ".join(x for x in (s.get("machine"), s.get("commit") and f"commit {s['commit']}",
                                      s.get("torch") and f"torch {s['torch']}",
                                      s.get("threads") and f"{s['threads']} thread{'s' * (s['threads'] != 1)}")
                          if x)
        return f"Measured {s['date']}" + (f" ({extra})" if extra else "") + "."
    if path is not None and path.exists():
        when = dt.datetime.fromtimestamp(path.stat().st_mtime, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        return (f"Date: not recorded (the file has no stamp); file modified {when}, a time a checkout also sets, "
                "so not necessarily when it was measured.")
    return "Date: not recorded."


def default_image(directory: Path, relative_to: Path) -> Callable[[str, str], str]:
    """A function ``(file name, alt text) -> markdown image``, or "" when the PNG is not there."""
    def image(name: str, alt: str) -> str:
        p = directory / name
        if not p.exists():
            return ""
        return f"![{alt}]({Path(os.path.relpath(p, relative_to)).as_posix()})\n"
    return image


def heading(level: int, text: str) -> str:
    return "#" * level + " " + text + "\n"


# ============================================================================ the report

@dataclass(frozen=True)
class Section:
    key: str          # results file stem and notes file name
    title: str
    command: str      # what produces it (used when the file does not say)
    module: str       # bench.<module> holds render_body (and optionally command_of)
    own_provenance: bool = False  # the body prints its parts' commands and stamps itself

    def bench_module(self):  # type: ignore[no-untyped-def]
        # imported here, not at the top: several benchmark modules import torch at module level
        return importlib.import_module(f"bench.{self.module}")

    def render(self, data: dict, image: Callable[[str, str], str]) -> Body:
        body = self.bench_module().render_body(data, image)
        # by type of str, not of Body: under `python -m bench.report` this module is __main__, and the
        # benchmark modules' Body is bench.report's, another class object
        return Body(body) if isinstance(body, str) else body

    def command_of(self, data: dict) -> str:
        """The command that produced ``data``: recorded in the file, else derived from it, else the default."""
        derive = getattr(self.bench_module(), "command_of", None)
        return data.get("command") or (derive(data) if derive else None) or self.command


SECTIONS = [
    Section("fair_ladder", "Fair method ladder: adaptive vs fixed mask with the same distillation",
            "python -m bench.fair_ladder", "fair_ladder", own_provenance=True),
    Section("train_throughput", "Training throughput: tokens/s and the share of a GEMM's FLOP/s",
            "python -m bench.train_throughput", "train_throughput", own_provenance=True),
    Section("ladder", "Method ladder (quality at one token budget)", "python -m bench.ladder", "ladder"),
    Section("sweep", "Decay sweep (λ_max × T0 at the bench budget)", "python -m bench.decay_sweep", "decay_sweep"),
    Section("step_overhead", "Overhead: AST step vs plain masked fine-tuning step", "python -m bench.step_overhead",
            "step_overhead"),
    Section("cache_formats", "Teacher cache: formats, gradient error, training from the cache",
            "python -m bench.cache_formats --part all", "cache_formats", own_provenance=True),
    Section("slorb_init", "SLoRB initialisation: the paper's mean vs least squares", "python -m bench.slorb_init",
            "slorb_init"),
    Section("compression", "Compression: 2:4 export vs fp16 dense", "python -m bench.compression", "compression"),
    Section("gpu_kernels", "GPU kernels: 2:4 (cuSPARSELt) vs dense", "python -m bench.gpu_kernels", "gpu_kernels"),
]

HEADER = """<!-- GENERATED FILE: do not edit by hand. Built by `make bench-report` (this report only)
     or `make bench` (every CPU benchmark, then this report) from bench/results/*.json;
     explanations come from bench/notes/<section>.md. -->
# Benchmark results

Generated by `make bench-report` (`python -m bench.report`) from the JSON files in `bench/results/`;
`make bench` re-runs every CPU benchmark first. **Do not edit this file by hand**: change a benchmark
or the hand-written notes in `bench/notes/<section>.md` and regenerate.
"""


def _note(notes: Path, key: str) -> str | None:
    p = notes / f"{key}.md"
    if p.exists():
        text = p.read_text(encoding="utf-8").strip()
        return text or None
    return None


def _load(path: Path) -> tuple[dict | None, str | None]:
    if not path.exists():
        return None, None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return None, f"{path.name} could not be read ({type(err).__name__}: {err})"
    if not isinstance(data, dict):
        return None, f"{path.name} holds a {type(data).__name__}, not an object"
    return data, None


def render_section(sec: Section, results: Path, out: Path, notes: Path) -> tuple[str, list[Verdict]]:
    """One section of RESULTS.md and its verdicts ("not measured yet" when the file is missing or unreadable)."""
    path = results / f"{sec.key}.json"
    data, problem = _load(path)
    lines = [heading(2, sec.title)]
    body = None
    if data is not None:
        try:
            body = sec.render(data, default_image(results, out.parent))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, ZeroDivisionError) as err:
            problem = f"{path.name} has an unexpected shape ({type(err).__name__}: {err})"
    if body is None:
        why = f" — {problem}" if problem else ""
        lines += [f"Not measured yet (run: `{sec.command}`){why}.", ""]
        verdicts: list[Verdict] = []
    else:
        if not sec.own_provenance:
            lines += [f"Command: `{sec.command_of(data)}`", "", stamp_line(data, path), ""]
        lines += [body.text.rstrip(), ""]
        verdicts = body.verdicts
        lines += [v.line() for v in verdicts]
        if verdicts:
            lines.append("")
    note = _note(notes, sec.key)
    if note:
        lines += [note, ""]
    elif any(v.met is False for v in verdicts):
        lines += [f"_Why the goal was missed: not written yet (add `bench/notes/{sec.key}.md`)._", ""]
    return "\n".join(lines), verdicts


def build_report(results: Path = RESULTS, out: Path = OUT, notes: Path = NOTES) -> str:
    parts, summary = [], []
    for sec in SECTIONS:
        text, verdicts = render_section(sec, results, out, notes)
        parts.append(text)
        summary += [(sec, v) for v in verdicts]
    glance = [heading(2, "Goals at a glance")]
    if summary:
        glance.append(markdown_table(["goal", "verdict", "measured", "section"],
                                     [[v.goal, f"**{v.word}**", v.measured, sec.title] for sec, v in summary], "llll"))
    else:
        glance.append("No goal measured yet.\n")
    missing = [sec for sec in SECTIONS if not (results / f"{sec.key}.json").exists()]
    if missing:
        glance.append("Not measured yet: " + ", ".join(f"{s.title} (`{s.command}`)" for s in missing) + ".\n")
    return "\n".join([HEADER, *glance, *parts]).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--notes", type=Path, default=NOTES)
    args = ap.parse_args(argv)
    text = build_report(args.results.resolve(), args.out.resolve(), args.notes.resolve())
    from ast_core.atomic import atomic_write_text
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
