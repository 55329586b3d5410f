"""A recipe, and the one call that turns a dense model into the student it trains.

The methods themselves (what each trains, distils and adapts) are the
registry of :mod:`ast_core.registry`; a :class:`Recipe` adds the settings
that shape the student (N:M pattern, initial mask, refresh score, SLoRB), and
:func:`prepare_student` applies them: sparsify → initial mask (through
:mod:`ast_core.oneshot`'s scores) → SLoRB.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from .registry import MethodSpec, method

if TYPE_CHECKING:
    import torch

__all__ = ["Recipe", "Student", "prepare_student"]


@dataclass(frozen=True)
class Recipe:
    """How a dense model becomes the student the loop trains: the method, the N:M pattern, the
    initial mask, the refresh score and SLoRB. Built from the validated config (``recipe_of``
    in ``tasks/train.py``); frozen, so what a run prepared is what it records."""
    method: str = "ast-boosted"
    n: int = 2
    m: int = 4
    exclude: tuple[str, ...] = ()
    init_mask: str = "wanda"             # wanda | magnitude
    wanda_refresh: bool = True           # refreshes score by |W|·‖x‖ with the calibration norms frozen (else |W|)
    slorb_group: int = 16
    slorb_trainable_projection: bool = False
    slorb_init: str = "lstsq"            # lstsq (S fitted to the calibration inputs) | mean (the paper's)

    @property
    def spec(self) -> MethodSpec:
        return method(self.method)


@dataclass
class Student:
    """A prepared student: the model, the Wanda refresh's frozen column scales (or None) and what
    preparing it recorded (one-shot timings, SLoRB parameter count)."""
    model: "torch.nn.Module"
    refresh_scale: "dict[str, torch.Tensor] | None"
    info: dict


def prepare_student(model: "torch.nn.Module", recipe: Recipe, calib_batches: "Callable[[], list]",
                    fresh: bool = True) -> Student:
    """Dense ``model`` → the student ``recipe`` trains (or the one-shot/dense model it evaluates).

    dense: unchanged. One-shot: sparsified and pruned once (:mod:`ast_core.oneshot`). Trained:
    sparsified, the initial N:M mask (Wanda from one calibration pass over the dense model, or
    magnitude), then SLoRB for methods that use it. ``calib_batches()`` is called only when a
    calibration pass is needed. ``fresh=False`` (a resume) skips what the checkpoint restores:
    masks, refresh scales and SLoRB's initial values; the modules are still built.
    """
    from .calibration import collect_act_sq_mean, collect_group_cross
    from .masks import magnitude_score, nm_mask, wanda_score
    from .oneshot import oneshot_prune
    from .slorb import add_slorb, check_group_size
    from .sparse import sparse_layers, sparsify

    spec = recipe.spec
    info: dict = {}
    if not spec.sparse:
        return Student(model, None, info)
    sparsify(model, recipe.n, recipe.m, list(recipe.exclude))
    if spec.oneshot:
        info.update(oneshot_prune(model, spec.oneshot, calib_batches()))
        return Student(model, None, info)
    refresh_scale = None
    if fresh:
        need_stats = recipe.init_mask == "wanda" or (spec.adaptive and recipe.wanda_refresh)
        stats = collect_act_sq_mean(model, calib_batches()) if need_stats else None
        for name, layer in sparse_layers(model):
            score = (wanda_score(layer.weight, stats[name]) if recipe.init_mask == "wanda"
                     else magnitude_score(layer.weight))
            layer.set_mask(nm_mask(score, layer.n, layer.m))
        if spec.adaptive and recipe.wanda_refresh:
            refresh_scale = {name: s.sqrt() for name, s in stats.items()}
    if spec.slorb:
        cross = None  # the paper's mean init; a resume loads S from the checkpoint either way
        if recipe.slorb_init == "lstsq" and fresh:
            check_group_size(model, recipe.slorb_group)  # before the calibration pass
            cross = collect_group_cross(model, calib_batches(), recipe.slorb_group)
        info["slorb_params"] = add_slorb(model, recipe.slorb_group, recipe.slorb_trainable_projection, cross)
    return Student(model, refresh_scale, info)
