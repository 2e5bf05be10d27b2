"""``AGLConfig``: every setting of :class:`agl.AGLLoss` and its default, as a plain, serialisable dataclass.

What each weight multiplies and how the defaults were chosen: docs/MATH.md §7 (units, the defaults and the runs that
chose them), §8 (budget mode), §9 (the cross-layer curvature).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from typing import Any, Dict, Optional

from agl.peft_binding import LayerFilter
from agl.state import AlignmentState
from agl.units import UNITS as _UNITS

__all__ = ["AGLConfig", "resolve_backend"]

_CURVATURES = ("diagonal", "cross", "identity")  # the metric of the align term (agl.curvature; identity: L2-SP)
_BACKENDS = ("auto", "kernel", "torch")
# every default weight, per unit system (docs/MATH.md §7 "The defaults" says which runs chose them)
_DEFAULT_WEIGHTS = {
    # rules 5-7 of docs/EXPERIMENT.md on SmolLM2-135M dev data (docs/results/2026-11-30-cpu-calibrated): λ_A from the
    # seed-0 λ grid; the task and collision terms helped at no weight that kept the task (rule 7), so they are off
    "nats": {"lambda_align": 1e4, "lambda_task": 0.0, "lambda_collision": 0.0},
    "paper": {"lambda_align": 1e5, "lambda_task": 1e4, "lambda_collision": 1.0},
}


class _Default(float):
    """A weight the user left unset: the default of the config's ``units``. It is a float everywhere, and it marks
    the value so that ``dataclasses.replace`` (which passes every field back to ``__init__``) resolves it again for
    the new ``units`` instead of keeping the old unit's number."""

    __slots__ = ()


def _finite(name: str, v, *, positive: bool = False, allow_negative: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"AGLConfig: `{name}` must be a finite number, got {v!r}")
    if positive and not v > 0:
        raise ValueError(f"AGLConfig: `{name}` must be > 0, got {v}")
    if not allow_negative and v < 0:
        raise ValueError(f"AGLConfig: `{name}` must be >= 0, got {v}")
    return float(v)


def _refuse_fixed(method: str, kw: Dict[str, Any], fixed, why: str) -> None:
    """A classmethod config (``ewc``, ``l2``) fixes ``fixed``: passing one of them is a mistake, not an override."""
    for k in fixed:
        if k in kw:
            raise ValueError(f"AGLConfig.{method}: `{k}` is fixed by the {why}")


# what curvature="identity" needs, and why: ½‖ΔW‖²_F has no Fisher, no subspaces, no nats and no per-layer means
_IDENTITY_NEEDS = {
    "units": ("nats", "the one unit system of the identity metric (its value is ½‖ΔW‖²_F, not nats)"),
    "subspaces": (False, "the isotropic penalty is on the whole update"),
    "lambda_task": (0.0, "the identity metric has no other term"),
    "lambda_collision": (0.0, "the identity metric has no other term"),
    "align_budget": (None, "a budget is in nats and ½‖ΔW‖²_F predicts nothing in nats"),
    "per_layer_terms": (False, "the per-layer means are the grouped op's, which the identity metric skips"),
}


def resolve_backend(backend: str, device) -> str:
    """``"auto"`` -> ``"kernel"`` when the compiled extension supports ``device``, else ``"torch"``."""
    if backend != "auto":
        return backend
    try:
        from agl.functional import kernel_supports

        return "kernel" if kernel_supports(device) else "torch"
    except Exception:  # extension absent or not loadable: the reference is always there
        return "torch"


@dataclass
class AGLConfig:
    """Hyper-parameters of :class:`agl.AGLLoss`. The regulariser is
    ``λ_A·align + λ_T·task + λ_NC·(α·overlap + (1 − α)·geodesic)``, each term summed over the adapted layers in the
    unit ``units`` gives it (docs/MATH.md §7 has the table of units and the runs that chose the defaults).

    - ``lambda_align``, ``lambda_task``, ``lambda_collision`` (λ_A, λ_T, λ_NC): None = the default of ``units``
      (nats: 1e4, 0, 0; paper: 1e5, 1e4, 1). Only the weights set explicitly are kept when ``dataclasses.replace``
      changes ``units``; the others take the new unit's defaults.
    - ``units``: ``"nats"`` (align = ``align_nats``, the predicted rise of the alignment loss in nats per token) or
      ``"paper"`` (means over elements and layers with the mean-normalised Fisher, the regulariser of agl ≤ the
      3-seed run).
    - ``alpha``: mix of the two collision terms; ``beta``, ``tau``, ``sharpness``, ``eps``: see ``agl.reference``
      (``tau`` is an absolute threshold on |ΔW|, the one setting here that is not unit-free).
    - ``subspaces``: False takes the whole update as the alignment part (ΔW_A = ΔW, ΔW_T = 0): the EWC penalty
      (:meth:`ewc`; docs/MATH.md §7, "EWC as a configuration").
    - ``align_budget`` ε > 0 (nats per token) or None: λ_A adapts once per optimiser step, from ``lambda_align``, to
      keep ``align_nats`` ≤ ε; ``budget_lr`` η (0.3) and ``budget_horizon`` H (10 steps) are its dual step and
      look-ahead (:class:`agl.budget.BudgetController`, docs/MATH.md §8).
    - ``task_metric``: ``"ones"`` (H = 1) or an :class:`AlignmentState` of the task data (a task Fisher, H = its F).
    - ``layers``: restrict to some LoRA layers (regex, collection of names, or callable ``name -> bool``).
    - ``backend``: ``"auto"`` (the fused kernel when built for the device, else the reference), ``"kernel"``,
      ``"torch"``.
    - ``per_layer_terms``: also record per-layer values in ``last_terms["layers"]`` (one host sync per step).
    - ``curvature``: the metric of the align term, ``"diagonal"`` (½·c·Σ F̃ (ΔW_A)²) or ``"cross"`` (the empirical
      Fisher across weights and layers, docs/MATH.md §9; needs ``units="nats"``, ``subspaces=True`` and a state with
      ``C``; with λ_T = λ_NC = 0 the grouped op is then skipped), or ``"identity"`` (F = 1: the isotropic L2-SP
      penalty ``align`` = ½·Σ_l ‖ΔW_l‖²_F in squared weight, not nats, with no ``align_nats``; :meth:`l2`, docs/MATH.md
      §7 "L2-SP as a configuration"; needs units="nats", subspaces=False, λ_T = λ_NC = 0, no ``align_budget`` and no
      ``per_layer_terms``; the grouped op is never called).

    :meth:`to_dict` / :meth:`from_dict` (and ``to_json`` / ``from_json``) round-trip every field but a task-Fisher
    ``task_metric`` and a callable ``layers``, which are live objects (a ValueError names them).
    """

    lambda_align: Optional[float] = None
    lambda_task: Optional[float] = None
    lambda_collision: Optional[float] = None
    alpha: float = 0.5
    beta: float = 4.0
    tau: float = 0.01
    sharpness: float = 100.0
    eps: float = 1e-12
    task_metric: Any = "ones"
    layers: LayerFilter = None
    backend: str = "auto"
    per_layer_terms: bool = False
    units: str = "nats"
    subspaces: bool = True
    align_budget: Optional[float] = None
    budget_lr: float = 0.3
    budget_horizon: float = 10.0
    curvature: str = "diagonal"

    @classmethod
    def ewc(cls, lambda_align: Optional[float] = None, **kw) -> "AGLConfig":
        """The EWC baseline as a config: the Fisher penalty on the whole update, no subspaces, no other term.
        In nats it is λ·½·c·Σ_l Σ_ij F̃ ΔW² (the predicted rise of the alignment loss); with ``units="paper"``
        λ·mean_l mean_ij F̃ ΔW² (the experiment's old ``EWCPenalty``). Other fields pass through (``backend``,
        ``units``, ``align_budget``, ...)."""
        _refuse_fixed("ewc", kw, ("subspaces", "lambda_task", "lambda_collision"),
                      "EWC form (subspaces=False, other terms 0)")
        return cls(lambda_align=lambda_align, lambda_task=0.0, lambda_collision=0.0, subspaces=False, **kw)

    @classmethod
    def l2(cls, rho: float, **kw) -> "AGLConfig":
        """The isotropic proximal penalty (L2-SP; Lisa's proximal term) as a config: ρ·½·Σ_l ‖ΔW_l‖²_F on the whole
        update (``curvature="identity"``, λ_A = ρ, no other term). ``rho`` finite and >= 0; other fields pass through
        (``backend``, ``layers``, ...)."""
        _refuse_fixed("l2", kw, ("lambda_align", "subspaces", "lambda_task", "lambda_collision", "curvature"),
                      "L2-SP form (lambda_align=rho, curvature='identity', subspaces=False, other terms 0)")
        return cls(lambda_align=_finite("rho", rho), lambda_task=0.0, lambda_collision=0.0, subspaces=False,
                   curvature="identity", **kw)

    def __post_init__(self):
        if self.units not in _UNITS:
            raise ValueError(f"AGLConfig: `units` must be one of {_UNITS}, got {self.units!r}")
        if self.curvature not in _CURVATURES:
            raise ValueError(f"AGLConfig: `curvature` must be one of {_CURVATURES}, got {self.curvature!r}")
        if self.curvature == "cross" and (self.units != "nats" or self.subspaces is False):
            raise ValueError("AGLConfig: `curvature='cross'` is the empirical Fisher's quadratic form on the alignment "
                             "subspaces, in nats: it needs units='nats' and subspaces=True, got "
                             f"units={self.units!r}, subspaces={self.subspaces!r}")
        for name, default in _DEFAULT_WEIGHTS[self.units].items():  # unset (or left at a default): this unit's
            v = getattr(self, name)
            setattr(self, name, _Default(default) if v is None or isinstance(v, _Default) else _finite(name, v))
        for name in ("beta", "tau", "sharpness", "eps"):
            setattr(self, name, _finite(name, getattr(self, name), allow_negative=name == "tau"))
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"AGLConfig: `alpha` must be in [0, 1], got {self.alpha!r}")
        self.alpha = float(self.alpha)
        if not isinstance(self.subspaces, bool):
            raise ValueError(f"AGLConfig: `subspaces` must be True or False, got {self.subspaces!r}")
        if self.align_budget is not None:
            self.align_budget = _finite("align_budget", self.align_budget, positive=True)
            if not self.lambda_align > 0:
                raise ValueError("AGLConfig: `align_budget` needs `lambda_align` > 0 (the multiplier's starting "
                                 f"value; dual ascent in log space cannot start from 0), got {self.lambda_align}")
        self.budget_lr = _finite("budget_lr", self.budget_lr, positive=True)
        self.budget_horizon = _finite("budget_horizon", self.budget_horizon)
        if self.backend not in _BACKENDS:
            raise ValueError(f"AGLConfig: `backend` must be 'auto', 'kernel' or 'torch', got {self.backend!r}")
        if not (self.task_metric == "ones" if isinstance(self.task_metric, str) else
                isinstance(self.task_metric, AlignmentState)):
            raise ValueError("AGLConfig: `task_metric` must be 'ones' or an agl.AlignmentState (a task Fisher), got "
                             f"{self.task_metric!r}")
        if self.layers is not None and not (isinstance(self.layers, str) or callable(self.layers)):
            try:
                self.layers = frozenset(self.layers)
            except TypeError:
                raise ValueError("AGLConfig: `layers` must be a regex, a collection of names or a callable, got "
                                 f"{self.layers!r}") from None
        if self.curvature == "identity":  # after the checks above: every field compared here is validated
            for name, (want, why) in _IDENTITY_NEEDS.items():
                if getattr(self, name) != want:
                    raise ValueError(f"AGLConfig: `curvature='identity'` needs `{name}`={want!r} ({why}), got "
                                     f"{getattr(self, name)!r}")

    # ------------------------------------------------------------------ serialisation
    def to_dict(self, resolve: bool = False) -> Dict[str, Any]:
        """Every field as plain JSON values (``layers`` as a sorted list). A weight left at its default is None
        (so :meth:`from_dict` gives it the default again), or its number with ``resolve=True`` (the weights in
        force, what a cache key should hold). A task-Fisher ``task_metric`` or a callable ``layers`` raises a
        ValueError naming the field."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "task_metric" and not isinstance(v, str):
                raise ValueError("AGLConfig.to_dict: `task_metric` is an AlignmentState (a task Fisher), which a "
                                 "config cannot hold; save it with its own .save() and set it after from_dict")
            if f.name == "layers" and callable(v):
                raise ValueError("AGLConfig.to_dict: `layers` is a callable filter, which a config cannot hold; "
                                 "use a regex or a collection of names")
            if isinstance(v, frozenset):
                v = sorted(v)
            elif isinstance(v, _Default):
                v = float(v) if resolve else None
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, d: Dict[str, Any], *, prefix: str = "") -> "AGLConfig":
        """The config :meth:`to_dict` wrote (validated as any config); unknown keys raise a ValueError naming them
        (each after ``prefix``, e.g. ``"agl."`` for the experiment's dotted keys)."""
        if not isinstance(d, dict):
            raise ValueError(f"AGLConfig.from_dict: expected a dict of AGLConfig fields, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config key(s): {', '.join(prefix + k for k in unknown)} (AGLConfig fields: "
                             f"{', '.join(sorted(names))})")
        return cls(**d)

    def to_json(self) -> str:
        """:meth:`to_dict` as JSON text (keys sorted)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "AGLConfig":
        """The config :meth:`to_json` wrote."""
        return cls.from_dict(json.loads(text))
