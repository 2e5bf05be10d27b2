"""``AGLLoss``: the drop-in AlignGuard-LoRA regulariser for any PyTorch / Hugging Face training loop.

Plain loop::

    state = agl.AlignmentState.load("state_dir")
    agl_loss = agl.AGLLoss(model, state)          # model: a peft LoRA model (or DDP-wrapped)
    loss = agl_loss(model(**batch).loss)          # task loss + regularisers
    loss.backward(); print(agl_loss.last_terms)

Hugging Face ``Trainer`` / TRL::

    agl_loss = agl.hf.attach(trainer, state, config)   # Trainer or TRL SFTTrainer: loss, logging, checkpoints

Per step, for every LoRA layer and active adapter l (factors B: m x r, A: r x n, ``scaling`` s, state F, U, V)::

    B_align = U (U^T B),  A_align = (A V) V^T        (= B, A when U / V is None or config.subspaces is False)
    T[l] = agl_terms(B, A, B_align, A_align, fisher=F, task_metric=H, scale=s, ...)   # (align, task, overlap, geodesic)
    (all layers at once: one agl_terms_grouped call per step, the projections formed inside the op)
    align, task, overlap, geodesic = the terms in config.units, from T (L x 4) and N_l = m·n (AGLConfig, docs/MATH.md)
    total = task_loss + lambda_align * align + lambda_task * task
            + lambda_collision * (alpha * overlap + (1 - alpha) * geodesic)

In the default ``units="nats"`` ``align`` is ``align_nats`` = ½·Σ_l Σ_ij F (ΔW_A)², the second-order prediction of the
rise of the alignment loss in nats per token (diagonal Fisher); with ``AGLConfig(curvature="cross")`` it is the
empirical Fisher's quadratic form across layers, ½·(1/ΣT)·Σ_n (Σ_l ⟨G_{n,l}, ΔW_A,l⟩)² (``agl.curvature``,
docs/MATH.md §9), which needs a state estimated with ``cross_curvature=True``. With ``AGLConfig(align_budget=ε)``
λ_A adapts to keep it at or below ε.

``fan_in_fan_out`` layers (weight stored (in, out)) use the transposed factors (A^T, B^T), so every term is taken in
the base weight's own orientation, the one the state uses. Nothing of size m x n is materialised with the kernel
backend; the torch backend (the reference) materialises it per layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from agl.budget import BudgetController
from agl.curvature import CrossCurvature
from agl.distributed import sharded_terms_for, sq_norm
from agl.functional import agl_terms_grouped
from agl.peft_binding import LayerFilter, LoraBinding, find_lora_layers
from agl.state import AlignmentState

__all__ = ["AGLConfig", "AGLLoss", "AGLLoggingCallback", "resolve_backend"]

_TERMS = ("align", "task", "overlap", "geodesic")


def resolve_backend(backend: str, device) -> str:
    """``"auto"`` -> ``"kernel"`` when the compiled extension supports ``device``, else ``"torch"``."""
    if backend != "auto":
        return backend
    try:
        from agl.functional import kernel_supports

        return "kernel" if kernel_supports(device) else "torch"
    except Exception:  # extension absent or not loadable: the reference is always there
        return "torch"


_UNITS = ("nats", "paper")
_CURVATURES = ("diagonal", "cross")  # the metric of the align term (AGLConfig.curvature; agl.curvature)
# every default weight, per unit system (AGLConfig resolves None to these); docs/MATH.md "Units" says what they mean
_DEFAULT_WEIGHTS = {
    # rules 5-7 of docs/EXPERIMENT.md on SmolLM2-135M dev data (docs/results/2026-11-30-cpu-calibrated): λ_A from the
    # seed-0 λ grid; the task and collision terms helped at no weight that kept the task (rule 7), so they are off
    "nats": {"lambda_align": 1e4, "lambda_task": 0.0, "lambda_collision": 0.0},
    "paper": {"lambda_align": 1e5, "lambda_task": 1e4, "lambda_collision": 1.0},
}


def _finite(name: str, v, *, positive: bool = False, allow_negative: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"AGLConfig: `{name}` must be a finite number, got {v!r}")
    if positive and not v > 0:
        raise ValueError(f"AGLConfig: `{name}` must be > 0, got {v}")
    if not allow_negative and v < 0:
        raise ValueError(f"AGLConfig: `{name}` must be >= 0, got {v}")
    return float(v)


@dataclass
class AGLConfig:
    """Hyper-parameters of :class:`AGLLoss`: the one home of every AGL weight and its default.

    The regulariser is ``λ_A·align + λ_T·task + λ_NC·(α·overlap + (1 − α)·geodesic)``, each term a sum over the
    adapted layers of one per-layer quantity, in the unit ``units`` gives it (docs/MATH.md, "Units"):

    ==========  ===============================================  ===================================================
    term        ``units="nats"`` (default)                         ``units="paper"`` (the raw form, old defaults)
    ==========  ===============================================  ===================================================
    align       ½·c·Σ_l Σ_ij F̃ (ΔW_A)²: predicted rise of the     mean_l mean_ij F̃ (ΔW_A)²  (F̃: Fisher, mean 1)
                alignment loss, nats per token (``align_nats``)
    task        with a task Fisher H: ½·c_H·Σ H̃ ΔW_T² (nats of   mean_l mean_ij H̃ ΔW_T²  (H̃ = 1 without a task
                task loss); else Σ_l ‖ΔW_T‖² / Σ_l ‖W0‖²          Fisher)
                (relative size, no unit)
    overlap     ½·c·Σ_l Σ_ij η |ΔW_A| |ΔW_T|: nats at the          mean_l mean_ij η |ΔW_A| |ΔW_T|
                alignment Fisher's mean curvature
    geodesic    Σ_l cos²_F(ΔW_A, ΔW_T) · align_nats_l: the nats    mean_l cos²_F(ΔW_A, ΔW_T)
                of ΔW_A that lie along ΔW_T
    ==========  ===============================================  ===================================================

    c = ``state.nats_scale`` (the un-normalised Fisher of the token-averaged alignment loss per unit of F̃), so in
    nats λ_A = 1 means "one nat (per token) of predicted alignment loss costs one nat of task loss".

    Fields:

    - ``lambda_align``, ``lambda_task``, ``lambda_collision`` (λ_A, λ_T, λ_NC): None = the default of ``units``
      (nats: 1e4, 0, 0, below; paper: 1e5, 1e4, 1). ``dataclasses.replace`` keeps resolved values: changing ``units`` that way
      keeps the old numbers, so set the weights too (or build a new config).
    - ``units``: ``"nats"`` or ``"paper"`` (means over elements and layers with the mean-normalised Fisher, exactly
      the regulariser of agl ≤ the 3-seed run).
    - ``alpha``: mix of the two collision terms; ``beta``, ``tau``, ``sharpness``, ``eps``: see ``agl.reference``
      (``tau`` is an absolute threshold on |ΔW|, the one setting here that is not unit-free).
    - ``subspaces``: False takes the whole update as the alignment part (U = V = None: ΔW_A = ΔW, ΔW_T = 0), so
      task, overlap and geodesic vanish and the regulariser is the EWC penalty λ_A·½·c·Σ F̃ ΔW²
      (:meth:`ewc` builds that config).
    - ``align_budget``: None (fixed λ_A), or ε > 0 in nats per token: λ_A then adapts every optimiser step to keep
      ``align_nats`` (a) at or below ε, by dual ascent on the multiplier in log space, starting from
      ``lambda_align`` (λ0), on the violation predicted ``budget_horizon`` (H) steps ahead:
      ``e = clamp((a + H·(a − a_prev))/ε − 1, −1, 3)``, ``log λ ← log λ + budget_lr · e``, λ kept within
      [λ0/1e6, λ0·1e6] (:class:`agl.budget.BudgetController`, ``AGLLoss.budget``). Looking ahead lets λ rise while
      a is still climbing towards ε: on the tiny test model (``bench/budget_controller.py``) the peak fell from 2.7ε
      (plain dual ascent) to 1.6ε and the last 20 of 80 steps average 0.95ε; docs/MATH.md §8 derives it. It steps
      once per optimiser step, also under gradient accumulation (the micro-batches' a is averaged; the step comes
      from ``AGLLoss.optimizer_step()``, which ``agl.hf.attach`` calls, or else from the LoRA factors changing in
      place), and never on a ``torch.no_grad`` or eval-mode call; ``AGLLoss.state_dict()`` carries it across a
      resume. Start λ0 within a few decades of the weight the budget needs: from 1e3 times too small the first peak
      was 2.7ε (1e3 too large: 1.07ε).
    - ``budget_lr``: the dual step size η (unit-free: λ changes by at most ×e^(3η) up, ÷e^η down per step;
      default 0.3). ``budget_horizon``: H in steps (default 10; 0 is plain dual ascent).
    - ``task_metric``: ``"ones"`` (H = 1) or an :class:`AlignmentState` of the task data (a task Fisher, H = its F).
    - ``layers``: restrict to some LoRA layers (regex, collection of names, or callable ``name -> bool``).
    - ``backend``: ``"auto"`` (the fused kernel when built for the device, else the reference), ``"kernel"``, ``"torch"``.
    - ``per_layer_terms``: also record per-layer values in ``last_terms["layers"]`` (one host sync per step).
    - ``curvature``: the metric of the align term. ``"diagonal"``: ½·c·Σ F̃ (ΔW_A)² (each weight alone);
      ``"cross"``: ½·(1/ΣT)·Σ_n z_n², z_n = Σ_l s_l⟨C_{n,l}, (U_lᵀB_l)(A_lV_l)⟩, the empirical Fisher on ΔW_A with
      every cross term between weights and layers (docs/MATH.md §9; needs ``units="nats"``, ``subspaces=True`` and
      a state with ``C``). With λ_T = λ_NC = 0 the grouped op is then skipped. ``last_terms`` logs
      ``align_nats_diagonal`` beside it when the op runs.

    The nats defaults are **λ_A = 1e4, λ_T = 0, λ_NC = 0**, chosen on dev data by rules written down before the
    runs (docs/EXPERIMENT.md, rules 5-7; docs/results/2026-11-30-cpu-calibrated) on SmolLM2-135M-Instruct, 30 LoRA
    steps of a benign task from an aligned start:

    - λ_A: the largest value of the grid 30 … 1e4 whose task dev EM stayed within 2 points of LoRA's. At λ_A = 1
      AGL was LoRA; the diagonal-Fisher quadratic form under-predicts the measured rise of the alignment loss by
      ~300× there (it ranks it correctly), so a nat of ``align_nats`` is worth ~300 measured nats and λ_A = 1e4 is
      ~30 measured-nat-for-nat. Expect the right λ_A on another model to be within a decade or so; a budget
      (``align_budget``) or a short λ grid on your own dev data is the way to set it there.
    - λ_T and λ_NC: each term was swept alone at λ_A = 1e4 (weights giving it 18-95% (task, overlap) and 0.1-86%
      (geodesic) of the regulariser's gradient). The task and overlap terms lowered the held-out alignment loss but
      cost more task dev EM than the 2-point tolerance at every weight tried; the geodesic term changed nothing until
      it cost task EM. None met the rule, so they default to 0: the default regulariser is the Fisher penalty on the
      alignment subspaces. They stay available (set the weights); ``units="paper"`` keeps the paper's form and weights.
    The paper-unit defaults were measured with ``bench/lambda_scale.py`` (bench/results/lambda_scale.json): on the
    real SmolLM2-135M-Instruct with a refusal-pair state, plain LoRA puts the mean align term at 0.4–1.2e-5, task
    1.4–4.3e-6, overlap 0.6–1.9e-7, geodesic 0.13 after 100–300 steps at lr 2e-4; λ_A = 1e5 makes the alignment
    term the order of a task loss there, and the task and collision weights turned out too small to matter
    (docs/results/2026-11-28-cpu-3seed) — the reason the nats units exist.
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
        for k in ("subspaces", "lambda_task", "lambda_collision"):
            if k in kw:
                raise ValueError(f"AGLConfig.ewc: `{k}` is fixed by the EWC form (subspaces=False, other terms 0)")
        return cls(lambda_align=lambda_align, lambda_task=0.0, lambda_collision=0.0, subspaces=False, **kw)

    def __post_init__(self):
        if self.units not in _UNITS:
            raise ValueError(f"AGLConfig: `units` must be one of {_UNITS}, got {self.units!r}")
        if self.curvature not in _CURVATURES:
            raise ValueError(f"AGLConfig: `curvature` must be one of {_CURVATURES}, got {self.curvature!r}")
        if self.curvature == "cross" and (self.units != "nats" or self.subspaces is False):
            raise ValueError("AGLConfig: `curvature='cross'` is the empirical Fisher's quadratic form on the alignment "
                             "subspaces, in nats: it needs units='nats' and subspaces=True, got "
                             f"units={self.units!r}, subspaces={self.subspaces!r}")
        for name, default in _DEFAULT_WEIGHTS[self.units].items():
            if getattr(self, name) is None:
                setattr(self, name, default)
        for name in ("lambda_align", "lambda_task", "lambda_collision", "beta", "tau", "sharpness", "eps"):
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
        if self.backend not in ("auto", "kernel", "torch"):
            raise ValueError(f"AGLConfig: `backend` must be 'auto', 'kernel' or 'torch', got {self.backend!r}")
        if not (isinstance(self.task_metric, str) and self.task_metric == "ones") and not isinstance(self.task_metric, AlignmentState):
            raise ValueError(
                f"AGLConfig: `task_metric` must be 'ones' or an agl.AlignmentState (a task Fisher), got {self.task_metric!r}"
            )
        if self.layers is not None and not (isinstance(self.layers, str) or callable(self.layers)):
            try:
                self.layers = frozenset(self.layers)
            except TypeError:
                raise ValueError(f"AGLConfig: `layers` must be a regex, a collection of names or a callable, got {self.layers!r}") from None


@dataclass
class _Entry:
    """One (layer, adapter) pair with its state tensors cached on the factors' device and dtype."""

    name: str
    adapter: str
    binding: LoraBinding
    A: nn.Parameter
    B: nn.Parameter
    scaling: float
    cache: Dict[Tuple, Tuple] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The name ``last_terms["layers"]`` uses: the layer's, with ``[adapter]`` when it has several."""
        return self.name if len(self.binding.adapters) == 1 else f"{self.name}[{self.adapter}]"

    @property
    def numel(self) -> int:
        """N_l = m·n, the elements of the base weight (the per-layer terms are means over them)."""
        m, n = self.binding.shape
        return int(m) * int(n)


def _base_weight_sq_norm(binding: LoraBinding) -> float:
    """‖W0‖²_F of the layer's frozen base weight (float64 sum)."""
    return sq_norm(binding.module.get_base_layer().weight)  # an FSDP2 DTensor too (its rows all-reduced)


class AGLLoss:
    """Task loss + AGL regularisers over every active peft LoRA adapter of ``model``; see the module docstring.

    ``state``: the :class:`AlignmentState` of the aligned model (checked against the model here: every mismatch is
    reported in one ``ValueError``). Merged adapters, a model without LoRA layers and FSDP1 / ZeRO-3 parameters
    raise clear errors. Under DDP the value is identical on every rank (same parameters, same state, and so the
    same budget multiplier). Under FSDP2 (``fully_shard``: DTensor LoRA factors), or with a
    ``ShardedAlignmentState``, each rank holds only its rows of every layer's Fisher; the per-layer grid sums are
    all-reduced before the terms are formed, so value and gradients equal the single-process ones
    (``agl.distributed``); every rank must then call the regulariser (it is a collective).
    """

    def __init__(self, model: nn.Module, state: AlignmentState, config: Optional[AGLConfig] = None):
        if not isinstance(state, AlignmentState):
            raise TypeError(f"AGLLoss: `state` must be an agl.AlignmentState, got {type(state).__name__}")
        self.config = config if config is not None else AGLConfig()
        if not isinstance(self.config, AGLConfig):
            raise TypeError(f"AGLLoss: `config` must be an agl.AGLConfig, got {type(self.config).__name__}")
        self.model = model
        self.state = state
        bindings = find_lora_layers(model, self.config.layers)
        state.check(model, self.config.layers)
        task_state = self.config.task_metric if isinstance(self.config.task_metric, AlignmentState) else None
        if task_state is not None:
            try:
                task_state.check(model, self.config.layers)
            except ValueError as exc:
                raise ValueError(f"AGLLoss: the task metric (task Fisher) state does not match the model: {exc}") from None
        self.entries: List[_Entry] = [
            _Entry(b.name, a.adapter, b, a.A, a.B, a.scaling) for b in bindings for a in b.adapters
        ]
        # FSDP2 (DTensor factors) or a row-sharded state: this rank holds only its Fisher rows (agl.distributed)
        self._sharded = sharded_terms_for(self.entries, state, task_state, self.config)
        self._cross = self._cross_curvature(state) if self.config.curvature == "cross" else None
        # unit conversions (docs/MATH.md, "Units"): nats per unit of Σ F̃ ΔW² for the alignment and the task Fisher,
        # and Σ_l ‖W0_l‖² for the relative size of the task part when there is no task Fisher
        self._numel = torch.tensor([e.numel for e in self.entries], dtype=torch.float64)
        self._numel_cache: Dict[Tuple, Tensor] = {}  # N_l on the terms' device and dtype: no host copy per step
        self._nats_align = float(state.nats_scale)
        self._nats_task = None if task_state is None else float(task_state.nats_scale)
        self._w0_sq = None
        if task_state is None and self.config.units == "nats":
            self._w0_sq = sum(_base_weight_sq_norm(e.binding) for e in self.entries)
            if not self._w0_sq > 0:
                raise ValueError("AGLLoss: the adapted base weights are all zero, so the task term's relative size "
                                 "‖ΔW_T‖²/‖W0‖² is undefined; give a task Fisher (`task_metric`) or units='paper'")
        # budget mode: the multiplier's controller (tensors only, so a step never syncs with the host)
        self.budget: Optional[BudgetController] = None if self.config.align_budget is None else \
            BudgetController.from_config(self.config, [p for e in self.entries for p in (e.A, e.B)])
        self._lambda_align: Optional[Tensor] = None  # a fixed λ_A set through the `lambda_align` setter
        self._fixed_lambda: Dict[Tuple, Tensor] = {}
        self._last: Dict[str, Tensor] = {}
        # with config.per_layer_terms: the last call's (L, 5) per-layer values (the 4 terms, align_nats), kept as one
        # tensor so logging adds no per-layer ops; turned into a dict only when last_terms is read
        self._last_layers: Optional[Tensor] = None
        self._running: Dict[str, Tensor] = {}
        self._running_n = 0

    # ------------------------------------------------------------------ state tensors
    def _tensors(self, e: _Entry, device, dtype):
        key = (str(device), dtype)
        hit = e.cache.get(key)
        if hit is None:
            ls = self.state.layers[e.name]
            conv = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
            H = None
            if isinstance(self.config.task_metric, AlignmentState):
                H = conv(self.config.task_metric.layers[e.name].fisher)
            U, V = (conv(ls.U), conv(ls.V)) if self.config.subspaces else (None, None)
            hit = (conv(ls.fisher), H, U, V)
            e.cache.clear()
            e.cache[key] = hit
        return hit

    def _cross_curvature(self, state: AlignmentState) -> CrossCurvature:
        """The cross-layer penalty over the entries whose layer has U, V and C (``agl.curvature``)."""
        if self._sharded is not None:
            raise NotImplementedError("AGLLoss: curvature='cross' is not supported under FSDP2 / a sharded state yet "
                                      "(z_n needs every layer's UᵀB; use curvature='diagonal' there)")
        if not state.has_cross:
            raise ValueError("AGLLoss: curvature='cross' needs the per-sample gradients projected on the subspaces, "
                             "and this state has none: estimate it with estimate_alignment_state(..., "
                             "cross_curvature=True) or add them with agl.curvature.estimate_cross_curvature")
        self._cross_idx = [i for i, e in enumerate(self.entries) if state.layers[e.name].C is not None]
        if not self._cross_idx:
            raise ValueError("AGLLoss: curvature='cross': none of the adapted layers has a projected gradient C")
        Us, Vs, Cs = [], [], []
        for i in self._cross_idx:
            ls = self.state.layers[self.entries[i].name]
            if tuple(ls.C.shape[1:]) != (ls.U.shape[1], ls.V.shape[1]):
                raise ValueError(f"AGLLoss: {self.entries[i].name}: C is {tuple(ls.C.shape)}, expected (N, "
                                 f"{ls.U.shape[1]}, {ls.V.shape[1]}) from its U and V")
            Us.append(ls.U)
            Vs.append(ls.V)
            Cs.append(ls.C)
        return CrossCurvature(Us, Vs, Cs, state.cross_tokens)

    def _factors(self):
        """(Ls, Rs, scales): every entry's update in the base weight's orientation, ΔW = s · L @ R."""
        Ls, Rs, scales = [], [], []
        for e in self.entries:
            A, B = e.A, e.B
            L, R = (A.t(), B.t()) if e.binding.fan_in_fan_out else (B, A)
            Ls.append(L)
            Rs.append(R)
            scales.append(e.scaling)
        return Ls, Rs, scales

    def cross_nats(self, factors=None) -> Tensor:
        """The cross-layer align_nats ½·(1/ΣT)·Σ_n z_n² of the current factors (``agl.curvature``); needs
        ``config.curvature == "cross"``."""
        if self._cross is None:
            raise ValueError("AGLLoss.cross_nats: the config's curvature is not 'cross'")
        Ls, Rs, scales = factors or self._factors()
        idx = self._cross_idx
        return self._cross([Ls[i] for i in idx], [Rs[i] for i in idx], [scales[i] for i in idx])[0]

    def _term_matrix(self, backend: str, factors=None) -> Tensor:
        """The (L, 4) terms (align, task, overlap, geodesic) of every entry, rows in ``self.entries`` order, from one
        ``agl_terms_grouped`` call: the op forms B_align = U (Uᵀ B), A_align = (A V) Vᵀ itself, so a step dispatches
        the same few ops whatever the number of layers (``fan_in_fan_out`` layers add one transpose each)."""
        if self._sharded is not None:  # FSDP2: each rank sums its Fisher rows; sums all-reduced (agl.distributed)
            return self._sharded.term_matrix(backend)
        Ls, Rs, scales = factors or self._factors()
        Fs, Hs, Us, Vs = [], [], [], []
        for e, L in zip(self.entries, Ls):
            F, H, U, V = self._tensors(e, L.device, L.dtype)
            Fs.append(F)
            Hs.append(H)
            Us.append(U)
            Vs.append(V)
        c = self.config
        return agl_terms_grouped(Ls, Rs, Us=Us, Vs=Vs, fishers=Fs, task_metrics=Hs if any(h is not None for h in Hs)
                                 else None, scales=scales, beta=c.beta, tau=c.tau, sharpness=c.sharpness, eps=c.eps,
                                 backend=backend)

    # ------------------------------------------------------------------ the loss
    @property
    def lambda_align(self) -> float:
        """λ_A in force: the budget controller's multiplier, else ``config.lambda_align`` (or the value set here)."""
        if self.budget is not None:
            return self.budget.value
        return float(self._lambda_align) if self._lambda_align is not None else self.config.lambda_align

    @lambda_align.setter
    def lambda_align(self, value: float) -> None:
        if self.budget is not None:
            self.budget.value = _finite("lambda_align", value, positive=True)
        else:
            self._lambda_align = torch.tensor(_finite("lambda_align", value), dtype=torch.float64)

    def _numel_like(self, T: Tensor) -> Tensor:
        """The per-layer element counts N_l = m·n as a tensor on ``T``'s device and dtype (made once per pair)."""
        key = (T.device, T.dtype)
        if key not in self._numel_cache:
            self._numel_cache[key] = self._numel.to(device=T.device, dtype=T.dtype)
        return self._numel_cache[key]

    def unit_terms(self, T: Tensor) -> Dict[str, Tensor]:
        """The four terms in ``config.units`` (see :class:`AGLConfig`) and ``align_nats``, from the (L, 4) matrix of
        per-layer means ``T``: per-layer sums are ``T · N_l`` (N_l = m·n), nats are ½·c·sums (c = ``nats_scale``).

        ``units="nats"``: align = ½cΣ_l N_l T_l0 (= align_nats); task = ½c_H Σ_l N_l T_l1 with a task Fisher, else
        Σ_l N_l T_l1 / Σ_l ‖W0_l‖²; overlap = ½cΣ_l N_l T_l2; geodesic = Σ_l T_l3 · ½cN_l T_l0.
        ``units="paper"``: the column means over layers."""
        N = self._numel_like(T)
        sums = T * N[:, None]
        align_l = 0.5 * self._nats_align * sums[:, 0]
        out = {"align_nats": align_l.sum()}
        if self.config.units == "paper":
            means = T.mean(0)
            out.update(zip(_TERMS, means.unbind()))
            return out
        task = sums[:, 1].sum()
        task = 0.5 * self._nats_task * task if self._nats_task is not None else task / self._w0_sq
        out.update(align=out["align_nats"], task=task, overlap=0.5 * self._nats_align * sums[:, 2].sum(),
                   geodesic=(align_l * T[:, 3]).sum())
        return out

    def _weighted(self):
        """(T or None, terms in units, λ_A in force, the weighted terms) for the factors as they are now. With the
        cross curvature and λ_T = λ_NC = 0 (and no per-layer log) the grouped op is skipped: every term it forms
        would be weighted by 0, so T is None and only the align term is formed (and logged)."""
        c = self.config
        factors = self._factors()
        if self._cross is not None and c.lambda_task == 0 and c.lambda_collision == 0 and not c.per_layer_terms:
            nats = self.cross_nats(factors)
            lam_a = self._lambda_align_tensor(nats)
            return None, {"align": nats, "align_nats": nats}, lam_a, {"align": lam_a * nats}
        T = self._term_matrix(resolve_backend(c.backend, self.entries[0].B.device), factors)
        u = self.unit_terms(T)
        if self._cross is not None:  # the align term in the cross-layer metric (agl.curvature)
            u["align_nats_diagonal"] = u["align_nats"]
            u["align_nats"] = u["align"] = self.cross_nats(factors)
        lam_a = self._lambda_align_tensor(T)
        parts = {
            "align": lam_a * u["align"],
            "task": c.lambda_task * u["task"],
            "overlap": c.lambda_collision * c.alpha * u["overlap"],
            "geodesic": c.lambda_collision * (1.0 - c.alpha) * u["geodesic"],
        }
        return T, u, lam_a, parts

    def regularizer(self) -> Tensor:
        """λ-weighted sum of the terms in ``config.units`` (a 0-dim tensor, differentiable w.r.t. every LoRA factor).
        Records ``last_terms``; in budget mode (``config.align_budget``), a call with gradients enabled in training
        mode is shown to the budget controller, which moves λ_A once per optimiser step (``agl.budget``)."""
        c = self.config
        observe = self.budget is not None and torch.is_grad_enabled() and self.entries[0].binding.module.training
        if observe:  # a plain loop's optimiser step since the last call moves λ_A before this call uses it
            self.budget.begin_call()
        T, u, lam_a, parts = self._weighted()
        reg = sum(parts.values())
        with torch.no_grad():
            denom = reg.detach()
            shares = {f"share_{k}": torch.where(denom > 0, v.detach() / denom, torch.zeros_like(denom))
                      for k, v in parts.items()}
        self._last = {**{k: u[k].detach() for k in _TERMS if k in u}, "regularizer": reg.detach(),
                      "align_nats": u["align_nats"].detach(), "lambda_align": lam_a.detach(), **shares}
        if "overlap" in u:
            self._last["collision"] = (c.alpha * u["overlap"] + (1.0 - c.alpha) * u["geodesic"]).detach()
        if "align_nats_diagonal" in u:
            self._last["align_nats_diagonal"] = u["align_nats_diagonal"].detach()
        self._last_layers = None
        if c.per_layer_terms:
            Td = T.detach()
            nats = 0.5 * self._nats_align * Td[:, 0] * self._numel_like(Td)
            self._last_layers = torch.cat([Td, nats[:, None]], dim=1)
        if observe:
            self.budget.observe(u["align_nats"])
        return reg

    def gradient_shares(self) -> Dict[str, float]:
        """How much each weighted term pulls on the LoRA factors now: ``grad_norm_<term>`` = ‖∂(λ·term)/∂θ‖₂ over
        every LoRA factor θ, ``grad_share_<term>`` = that norm / the sum of the four (0 when all are 0), and
        ``grad_norm_total`` = ‖∂ regulariser/∂θ‖₂ (≤ the sum; less when terms pull against each other). Four
        backward passes through the regulariser and nothing recorded (``last_terms``, the budget multiplier and the
        factors' ``.grad`` are left alone): a probe for calibrating weights, not something to call every step."""
        params = list({id(p): p for e in self.entries for p in (e.A, e.B)}.values())
        with torch.enable_grad():
            _, _, _, parts = self._weighted()
            norms = {}
            for k, v in parts.items():
                grads = torch.autograd.grad(v, params, retain_graph=True, allow_unused=True) if v.requires_grad else ()
                norms[k] = math.sqrt(sum(float(g.double().square().sum()) for g in grads if g is not None))
            total = sum(parts.values())
            grads = torch.autograd.grad(total, params, allow_unused=True) if total.requires_grad else ()
        out = {f"grad_norm_{k}": v for k, v in norms.items()}
        out["grad_norm_total"] = math.sqrt(sum(float(g.double().square().sum()) for g in grads if g is not None))
        denom = sum(norms.values())
        out.update({f"grad_share_{k}": (v / denom if denom > 0 else 0.0) for k, v in norms.items()})
        return out

    def _lambda_align_tensor(self, like: Tensor) -> Tensor:
        """λ_A as a 0-dim tensor on ``like``'s device and dtype (the fixed weight is made once per device)."""
        if self.budget is not None:
            return self.budget.multiplier(like)
        if self._lambda_align is None:
            fixed = self._fixed_lambda.get((like.device, like.dtype))
            if fixed is None:
                fixed = self._fixed_lambda[(like.device, like.dtype)] = torch.tensor(
                    self.config.lambda_align, dtype=like.dtype, device=like.device)
            return fixed
        if self._lambda_align.device != like.device:
            self._lambda_align = self._lambda_align.to(like.device)
        return self._lambda_align.to(like.dtype)

    def optimizer_step(self) -> None:
        """Tell the budget controller an optimiser step happened (after ``optimizer.step()``): λ_A takes one step on
        the micro-batches since the last one. Needed only when the optimiser does not update the LoRA factors in
        place; ``agl.hf.attach`` calls it. A no-op with a fixed λ_A."""
        if self.budget is not None:
            self.budget.optimizer_step()

    def state_dict(self) -> Dict[str, Any]:
        """What a resumed run needs to continue as it was (JSON-able): the budget controller's state (None with a
        fixed λ_A) and a fixed λ_A set through ``lambda_align`` (else None)."""
        return {"budget": None if self.budget is None else self.budget.state_dict(),
                "lambda_align": None if self._lambda_align is None else float(self._lambda_align)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (into a loss built with the same ``align_budget`` mode)."""
        if not isinstance(state, dict) or set(state) != {"budget", "lambda_align"}:
            raise ValueError("AGLLoss.load_state_dict: `state` must be a dict with keys 'budget' and 'lambda_align' "
                             f"(AGLLoss.state_dict()), got {sorted(state) if isinstance(state, dict) else state!r}")
        if (state["budget"] is None) != (self.budget is None):
            mode = lambda has: "with a budget" if has else "with a fixed λ_A"  # noqa: E731
            raise ValueError(f"AGLLoss.load_state_dict: `state` is from a loss {mode(state['budget'] is not None)}, "
                             f"this one is {mode(self.budget is not None)}; set AGLConfig.align_budget as in the run saved")
        if self.budget is not None:
            self.budget.load_state_dict(state["budget"])
        if state["lambda_align"] is not None:
            self.lambda_align = state["lambda_align"]

    def __call__(self, task_loss: Tensor) -> Tensor:
        """``task_loss`` + regularisers (0-dim tensor)."""
        reg = self.regularizer()
        total = task_loss + reg.to(task_loss.dtype) if torch.is_tensor(task_loss) else reg + task_loss
        self._record(task_loss, total)
        return total

    def _record(self, task_loss, total) -> None:
        self._last["task_loss"] = task_loss.detach().float() if torch.is_tensor(task_loss) else torch.tensor(float(task_loss))
        self._last["total"] = total.detach().float()
        for k, v in self._last.items():
            self._running[k] = v if k not in self._running else self._running[k] + v.to(self._running[k].device)
        self._running_n += 1

    def trainer_loss(self, outputs, labels: Optional[Tensor], num_items_in_batch=None) -> Tensor:
        """A ``compute_loss_func`` for ``transformers.Trainer`` (and TRL): causal-LM loss of ``outputs.logits``
        against ``labels`` (shifted, -100 ignored; summed / ``num_items_in_batch`` when given, else the mean), plus
        the regulariser. With ``num_items_in_batch`` (gradient accumulation, token averaging across devices) the
        regulariser is weighted by this micro-batch's share of the counted tokens, so it enters each optimiser step
        exactly once in total."""
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
        if labels is None:
            task = outputs["loss"] if isinstance(outputs, dict) else outputs.loss
            weight = 1.0
        else:
            lg = logits[..., :-1, :].float()
            tg = labels[..., 1:].to(lg.device)
            ce = nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), tg.reshape(-1), ignore_index=-100, reduction="sum")
            local = (tg != -100).sum()
            if num_items_in_batch is None:
                task = ce / local.clamp_min(1)
                weight = 1.0
            else:
                nib = num_items_in_batch.to(lg.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
                task = ce / nib
                weight = local.float() / nib
        reg = self.regularizer()
        total = task + weight * reg
        self._record(task, task + reg)
        return total

    # ------------------------------------------------------------------ logging
    @property
    def last_terms(self) -> Dict[str, Any]:
        """Floats of the last call:

        - ``align``, ``task``, ``overlap``, ``geodesic``: the terms in ``config.units`` (what the weights multiply;
          see :class:`AGLConfig`), ``collision`` (their α-mix), ``regularizer`` (λ-weighted sum);
        - ``align_nats``: the predicted rise of the alignment loss, ½·Σ_l Σ_ij F (ΔW_A)² with the un-normalised
          per-token Fisher (nats per token), whatever the units;
        - ``lambda_align``: the λ_A in force (the budget controller's multiplier in budget mode);
        - ``share_align``, ``share_task``, ``share_overlap``, ``share_geodesic``: each weighted term's fraction of the
          regulariser (sum to 1; all 0 when the regulariser is 0);
        - ``task_loss``, ``total``; plus ``layers`` (name -> per-layer means as ``agl_terms`` gives them and the
          layer's ``align_nats``) when ``config.per_layer_terms``."""
        out: Dict[str, Any] = {k: float(v) for k, v in self._last.items()}
        if self._last_layers is not None:
            out["layers"] = self._layers_dict(self._last_layers, (*_TERMS, "align_nats"))
        return out

    def _layers_dict(self, values: Tensor, names) -> Dict[str, Dict[str, float]]:
        """(L, k) per-layer values -> {layer key: {name: float}} (one host copy)."""
        return {e.key: dict(zip(names, row)) for e, row in zip(self.entries, values.double().tolist())}

    @torch.no_grad()
    def layer_terms(self) -> Dict[str, Dict[str, float]]:
        """Per-layer (and adapter) values of the four terms now (per-element means, as ``agl_terms`` gives them),
        without recording anything."""
        T = self._term_matrix(resolve_backend(self.config.backend, self.entries[0].B.device))
        return self._layers_dict(T, _TERMS)

    def pop_running_means(self) -> Dict[str, float]:
        """Means of the recorded terms since the last call (what the logging callback reports), then reset."""
        if not self._running_n:
            return {}
        out = {k: float(v) / self._running_n for k, v in self._running.items()}
        self._running, self._running_n = {}, 0
        return out


def __getattr__(name):  # the callback needs transformers: build it on first use
    if name == "AGLLoggingCallback":
        from agl._hf import AGLLoggingCallback

        return AGLLoggingCallback
    raise AttributeError(f"module 'agl.loss' has no attribute {name!r}")
