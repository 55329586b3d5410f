"""The names a configuration may choose from, each defined once: the methods and the zero-shot tasks.

Every place that needs a method's name or behaviour (the config's allowed
values, the train stage, the training loop, ``compare``, the benchmarks, the
one-shot dispatch) reads :data:`METHODS`; the zero-shot tasks are the YAML
files of ``ast_core/lm_eval_tasks/``. This module imports nothing heavy, so
the configuration can validate against it cheaply.

=================  ======  ========  ============  =====  ==================
name               trains  distils   mask adapts   SLoRB  how it is pruned
=================  ======  ========  ============  =====  ==================
dense              no      –         –             no     not pruned
oneshot-magnitude  no      –         –             no     magnitude, once
oneshot-wanda      no      –         –             no     Wanda, once
oneshot-sparsegpt  no      –         –             no     SparseGPT, once
naive              yes     no (CE)   no (fixed)    no     initial mask
fixed-kd           yes     yes       no (fixed)    no     initial mask
fixed-kd-slorb     yes     yes       no (fixed)    yes    initial mask
ast-naive          yes     yes       yes           no     initial mask
ast-boosted        yes     yes       yes           yes    initial mask
=================  ======  ========  ============  =====  ==================

``fixed-kd`` is the control that isolates AST's adaptive mask: the same
initial mask, data, schedule and distillation as ``ast-naive``, but the mask
never refreshes and no decay is applied to the pruned weights.
``fixed-kd-slorb`` is the same control for ``ast-boosted``: its SLoRB branch
on a mask that never moves.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class MethodSpec:
    name: str
    trains: bool             # runs the training loop (else: dense or one-shot pruning only)
    distils: bool = False    # loss = α·KL(teacher‖student)·T² + (1−α)·CE (else CE only)
    adaptive: bool = False   # masks refresh every Δt steps and λ(t) decays the pruned weights
    slorb: bool = False      # SLoRB side parameters attached after the initial mask
    oneshot: str | None = None  # the one-shot pruner's name (magnitude, wanda, sparsegpt)
    summary: str = ""

    @property
    def sparse(self) -> bool:
        return self.name != "dense"


METHODS: dict[str, MethodSpec] = {m.name: m for m in (
    MethodSpec("dense", trains=False, summary="the dense model, unpruned (the reference)"),
    MethodSpec("oneshot-magnitude", trains=False, oneshot="magnitude", summary="2:4 by |W|, no training"),
    MethodSpec("oneshot-wanda", trains=False, oneshot="wanda", summary="2:4 by |W|·‖x‖, no training"),
    MethodSpec("oneshot-sparsegpt", trains=False, oneshot="sparsegpt",
               summary="2:4 by SparseGPT (OBS weight updates), no training"),
    MethodSpec("naive", trains=True, summary="fixed initial mask, cross-entropy only"),
    MethodSpec("fixed-kd", trains=True, distils=True,
               summary="fixed initial mask, the same distillation as AST (no refresh, no decay)"),
    MethodSpec("fixed-kd-slorb", trains=True, distils=True, slorb=True,
               summary="fixed-kd + SLoRB side parameters (the control of ast-boosted)"),
    MethodSpec("ast-naive", trains=True, distils=True, adaptive=True,
               summary="AST: adaptive mask (decay + refresh) + distillation"),
    MethodSpec("ast-boosted", trains=True, distils=True, adaptive=True, slorb=True,
               summary="AST-Naive + SLoRB side parameters"),
)}
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)


def method(name: str) -> MethodSpec:
    """The spec of ``name``; a ValueError naming the known methods otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}") from None


TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
ZERO_SHOT_TASKS: tuple[str, ...] = tuple(sorted(p.stem for p in TASKS_DIR.glob("*.yaml")))
"""Every supported zero-shot task: one per ``lm_eval_tasks/<name>.yaml``."""
