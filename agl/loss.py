"""``AGLLoss``: the drop-in AlignGuard-LoRA regulariser for any PyTorch / Hugging Face training loop.

Plain loop::

    state = agl.AlignmentState.load("state_dir")
    agl_loss = agl.AGLLoss(model, state)          # model: a peft LoRA model (or DDP-wrapped)
    loss = agl_loss(model(**batch).loss)          # task loss + regularisers
    loss.backward(); print(agl_loss.last_terms)

Hugging Face ``Trainer`` / TRL::

    Trainer(model=model, ..., compute_loss_func=agl_loss.trainer_loss, callbacks=[AGLLoggingCallback(agl_loss)])

Per step, for every LoRA layer and active adapter (factors B: m x r, A: r x n, ``scaling`` s, state F, U, V)::

    B_align = U (U^T B),  A_align = (A V) V^T        (B_align = B when U is None, A_align = A when V is None)
    align, task, overlap, geodesic = agl_terms(B, A, B_align, A_align, fisher=F, task_metric=H, scale=s, ...)
    (all layers at once: one agl_terms_grouped call per step, the projections formed inside the op)
    total = task_loss + lambda_align * mean(align) + lambda_task * mean(task)
            + lambda_collision * mean(alpha * overlap + (1 - alpha) * geodesic)

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


@dataclass
class AGLConfig:
    """Hyper-parameters of :class:`AGLLoss`.

    - ``lambda_align`` (λ_A), ``lambda_task`` (λ_T), ``lambda_collision`` (λ_NC): weights of mean-over-layers
      ``align``, ``task`` and ``alpha * overlap + (1 - alpha) * geodesic``.
    - ``alpha``: mix of the two collision terms; ``beta``, ``tau``, ``sharpness``, ``eps``: see ``agl.reference``.
    - ``task_metric``: ``"ones"`` (H = 1) or an :class:`AlignmentState` of the task data (a task Fisher, H = its F).
    - ``layers``: restrict to some LoRA layers (regex, collection of names, or callable ``name -> bool``).
    - ``backend``: ``"auto"`` (the fused kernel when built for the device, else the reference), ``"kernel"``, ``"torch"``.
    - ``per_layer_terms``: also record per-layer values in ``last_terms["layers"]`` (one host sync per step).

    How the defaults were chosen (``bench/lambda_scale.py`` reproduces it; numbers in bench/results/lambda_scale.json).
    ``align``, ``task`` and ``overlap`` are means over the m x n entries of quadratic forms in ΔW = s·B·A (F has
    mean 1), so they scale as |ΔW|² and are tiny in absolute terms; ``geodesic`` is a squared cosine in [0, 1].
    We ran plain LoRA (r = 8, alpha = 16, q/k/v/o, AdamW) and read the raw terms along the way:

    ===========================================  ==========  =========  =========  =========  =========
    run (state from its own model)               task loss   align      task       overlap    geodesic
    ===========================================  ==========  =========  =========  =========  =========
    SmolLM2-135M-Instruct (real weights),        0.04–0.20   0.4–1.2e-5 1.4–4.3e-6 0.6–1.9e-7 0.13
    refusal-pair state, arithmetic task,
    10–30 steps at lr 2e-3 (≈ 100–300 at 2e-4)
    SmolLM2-shaped, random weights, 20–30 steps  8.8–9.3    1.4–3.7e-8 0.9–2.5e-5 1.3–4.7e-6 2e-5
    at lr 2e-3, random tokens
    tiny test Llama (hidden 64), 150 steps at    4.7        4.9e-6     5.0e-5     4.6e-5     1e-3
    lr 2e-4, random tokens
    ===========================================  ==========  =========  =========  =========  =========

    The real aligned model is the typical case: its fine-tuning update falls largely inside the alignment
    subspaces (align > task), which random-weight models do not show. λ_A = 1e5 puts the alignment term at 0.4–1.2
    there, the order of a fine-tuning task loss (0.1–2 nats); λ_T = 1e4 keeps the task-subspace pull ~10x weaker
    (it must stay free to learn; 0.01–0.25 across the runs); λ_NC = 1 with alpha = 0.5 makes the collision term
    ~0.07 on the real model, carried by the geodesic part (the overlap part is |ΔW|²-sized and only matters with
    alpha near 1 or a large λ_NC). Every term is 0 at peft's B = 0 init and grows as |ΔW|² (geodesic excepted),
    so the regularisers start at 0 and reach these levels after ~100 steps. Retune λ_A first: raise it when
    alignment drifts, lower it when the task loss stalls; ``last_terms`` shows each contribution.
    """

    lambda_align: float = 1e5
    lambda_task: float = 1e4
    lambda_collision: float = 1.0
    alpha: float = 0.5
    beta: float = 4.0
    tau: float = 0.01
    sharpness: float = 100.0
    eps: float = 1e-12
    task_metric: Any = "ones"
    layers: LayerFilter = None
    backend: str = "auto"
    per_layer_terms: bool = False

    def __post_init__(self):
        for name in ("lambda_align", "lambda_task", "lambda_collision", "beta", "tau", "sharpness", "eps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"AGLConfig: `{name}` must be a finite number, got {v!r}")
            if v < 0 and name != "tau":
                raise ValueError(f"AGLConfig: `{name}` must be >= 0, got {v}")
            setattr(self, name, float(v))
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"AGLConfig: `alpha` must be in [0, 1], got {self.alpha!r}")
        self.alpha = float(self.alpha)
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


class AGLLoss:
    """Task loss + AGL regularisers over every active peft LoRA adapter of ``model``; see the module docstring.

    ``state``: the :class:`AlignmentState` of the aligned model (checked against the model here: every mismatch is
    reported in one ``ValueError``). Merged adapters, a model without LoRA layers and sharded (FSDP / ZeRO-3)
    parameters raise clear errors. Under DDP the value is identical on every rank (same parameters, same state).
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
        if isinstance(self.config.task_metric, AlignmentState):
            try:
                self.config.task_metric.check(model, self.config.layers)
            except ValueError as exc:
                raise ValueError(f"AGLLoss: the task metric (task Fisher) state does not match the model: {exc}") from None
        self.entries: List[_Entry] = [
            _Entry(b.name, a.adapter, b, a.A, a.B, a.scaling) for b in bindings for a in b.adapters
        ]
        self._layer_keys = [e.name if len(e.binding.adapters) == 1 else f"{e.name}[{e.adapter}]" for e in self.entries]
        self._last: Dict[str, Tensor] = {}
        self._last_layers: Optional[Tensor] = None  # (L, 4) terms of the last call, with config.per_layer_terms
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
            hit = (conv(ls.fisher), H, conv(ls.U), conv(ls.V))
            e.cache.clear()
            e.cache[key] = hit
        return hit

    def _term_matrix(self, backend: str) -> Tensor:
        """The (L, 4) terms (align, task, overlap, geodesic) of every entry, rows in ``self.entries`` order, from one
        ``agl_terms_grouped`` call: the op forms B_align = U (Uᵀ B), A_align = (A V) Vᵀ itself, so a step dispatches
        the same few ops whatever the number of layers (``fan_in_fan_out`` layers add one transpose each)."""
        Ls, Rs, Fs, Hs, Us, Vs, scales = [], [], [], [], [], [], []
        for e in self.entries:
            A, B = e.A, e.B
            L, R = (A.t(), B.t()) if e.binding.fan_in_fan_out else (B, A)  # weight orientation: ΔW = s · L @ R
            F, H, U, V = self._tensors(e, L.device, L.dtype)
            Ls.append(L)
            Rs.append(R)
            Fs.append(F)
            Hs.append(H)
            Us.append(U)
            Vs.append(V)
            scales.append(e.scaling)
        c = self.config
        return agl_terms_grouped(Ls, Rs, Us=Us, Vs=Vs, fishers=Fs, task_metrics=Hs if any(h is not None for h in Hs)
                                 else None, scales=scales, beta=c.beta, tau=c.tau, sharpness=c.sharpness, eps=c.eps,
                                 backend=backend)

    # ------------------------------------------------------------------ the loss
    def regularizer(self) -> Tensor:
        """λ-weighted sum of the mean-over-layers terms (a 0-dim tensor, differentiable w.r.t. every LoRA factor).
        Also records ``last_terms``."""
        c = self.config
        backend = resolve_backend(c.backend, self.entries[0].B.device)
        terms = self._term_matrix(backend)  # (L, 4), float32 (float64 with float64 factors)
        sums = dict(zip(_TERMS, terms.sum(0).unbind()))
        per_layer = terms.detach() if c.per_layer_terms else None
        n = len(self.entries)
        means = {k: v / n for k, v in sums.items()}
        collision = c.alpha * means["overlap"] + (1.0 - c.alpha) * means["geodesic"]
        reg = c.lambda_align * means["align"] + c.lambda_task * means["task"] + c.lambda_collision * collision
        self._last = {**{k: v.detach() for k, v in means.items()}, "collision": collision.detach(), "regularizer": reg.detach()}
        self._last_layers = per_layer
        return reg

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
        """Floats of the last call: mean-over-layers ``align``, ``task``, ``overlap``, ``geodesic``, ``collision``
        (alpha-mix), ``regularizer`` (λ-weighted), ``task_loss``, ``total``; plus ``layers`` (name -> term -> float)
        when ``config.per_layer_terms``."""
        out: Dict[str, Any] = {k: float(v) for k, v in self._last.items()}
        if self._last_layers is not None:
            out["layers"] = self._layers_dict(self._last_layers)
        return out

    @torch.no_grad()
    def layer_terms(self) -> Dict[str, Dict[str, float]]:
        """Per-layer (and adapter) values of the four terms now, without recording anything."""
        backend = resolve_backend(self.config.backend, self.entries[0].B.device)
        return self._layers_dict(self._term_matrix(backend))

    def _layers_dict(self, terms: Tensor) -> Dict[str, Dict[str, float]]:
        """(L, 4) terms -> {layer key: {term: float}} (one host copy)."""
        return {key: dict(zip(_TERMS, row)) for key, row in zip(self._layer_keys, terms.double().tolist())}

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
