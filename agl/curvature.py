"""Cross-layer curvature: the empirical Fisher's exact quadratic form on the alignment subspaces, across layers.

Why (docs/MATH.md §9, docs/results/2026-12-05-curvature): along a LoRA update the alignment loss rises through
per-sample gradients that are *coherent* across weights and across layers. A diagonal Fisher (or any per-layer
metric) drops those cross terms and under-predicts the rise by two to four decades. The empirical Fisher keeps them:

    ΔL ≈ ½ · (1/ΣT) · Σ_n (Σ_l ⟨G_{n,l}, ΔW_l⟩)²          (nats per token of the token-averaged alignment loss)

with G_{n,l} (m x n) the gradient of sample n's summed token loss w.r.t. layer l's weight and ΣT the labelled tokens
of the N samples. Storing every G_{n,l} is out of the question (N·Σ m·n); storing its projection on the state's
subspaces is cheap:

    C_{n,l} = U_lᵀ G_{n,l} V_l  (k x k')  = Σ_t (U_lᵀ δ_t)(V_lᵀ x_t)ᵀ     (hooks: G = Σ_t δ_t x_tᵀ is never formed)

and since ⟨C_{n,l}, U_lᵀ ΔW_l V_l⟩ = ⟨G_{n,l}, U_l U_lᵀ ΔW_l V_l V_lᵀ⟩ = ⟨G_{n,l}, ΔW_A,l⟩, the penalty

    align_nats = ½ · (1/ΣT) · Σ_n z_n²,    z_n = Σ_l s_l · ⟨C_{n,l}, (U_lᵀ B_l)(A_l V_l)⟩

is the empirical Fisher's exact quadratic form on ΔW_A, across layers, computed from the LoRA factors alone: per
layer a k x r and an r x k' product and their k x k' product M_l, then one (N, Σ_l k_l k'_l) x (Σ_l k_l k'_l) GEMV.
Nothing of size m x n is formed; autograd differentiates it (all GEMMs: BLAS / cuBLAS are the right kernels).

The rank of the penalty is at most N (one direction z_n per sample): an update orthogonal to every projected
per-sample gradient costs nothing. How far that lets a penalised fine-tune slip is measured, not assumed
(docs/results/2026-12-05-curvature).
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = ["estimate_cross_curvature", "cross_align_nats", "projected_updates", "CrossCurvature"]


# ------------------------------------------------------------------------------------------------ estimation
class _CrossAccumulator:
    """Per-sample projected gradients C_n = Uᵀ G_n V of one layer, rows appended in sample order (float64 sums)."""

    def __init__(self, U: Tensor, V: Tensor, fan_in_fan_out: bool, compute_dtype: torch.dtype):
        self.U = U.to(compute_dtype)
        self.V = V.to(compute_dtype)
        self.fifo = fan_in_fan_out
        self.rows: List[Tensor] = []

    def add(self, delta: Tensor, X: Tensor) -> None:
        """delta (b, T, out), X (b, T, in): G_i = delta_iᵀ X_i (out x in) or its transpose for fan_in_fan_out;
        appends C_i = (R_i U)ᵀ (K_i V) with (R, K) the factors of G's rows and columns."""
        if delta.dim() == 2:
            delta, X = delta.unsqueeze(1), X.unsqueeze(1)
        elif delta.dim() > 3:
            delta, X = delta.flatten(1, -2), X.flatten(1, -2)
        R, K = (X, delta) if self.fifo else (delta, X)
        P = R.to(self.U.dtype) @ self.U  # (b, T, k)
        Q = K.to(self.V.dtype) @ self.V  # (b, T, k')
        self.rows.append(torch.bmm(P.transpose(1, 2), Q).to(torch.float64))


def estimate_cross_curvature(model: nn.Module, batches: Iterable[Mapping[str, Tensor]], state, *,
                             modules: Optional[Sequence[str]] = None, fisher: str = "empirical",
                             max_samples: Optional[int] = None, seed: int = 0, progress: bool = True,
                             dtype: torch.dtype = torch.float32):
    """Adds the projected per-sample gradients ``C`` (N, k, k') to every layer of ``state`` that has both U and V,
    from one forward/backward per batch of ``batches`` (the same samples, labels and ``fisher`` kind the state was
    estimated with: pass the same data). Sets ``state.cross_samples`` (N) and ``state.cross_tokens`` (their
    labelled tokens, ΣT). Returns ``state`` (modified in place).

    Single process only (under ``torch.distributed`` the rows of C would have to be gathered; not implemented)."""
    from agl.per_sample import _compute_dtype, _labelled_tokens, _model_device, hook_layer_gradients, hooked_passes
    from agl.peft_binding import resolve_targets, unwrap_model

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise NotImplementedError("agl: estimate_cross_curvature runs in a single process (its per-sample rows are "
                                  "not gathered across ranks); estimate on one rank and load the state on all")
    if fisher not in ("empirical", "true"):
        raise ValueError(f"agl: `fisher` must be 'empirical' or 'true', got {fisher!r}")
    net = unwrap_model(model)
    targets = resolve_targets(net, modules if modules is not None else list(state.layers))
    missing = [n for n in targets if n not in state.layers]
    if missing:
        raise ValueError(f"agl: estimate_cross_curvature: layers {missing[:5]} are not in the state")
    device = _model_device(net)
    cdtype = _compute_dtype(net)
    accs: Dict[str, _CrossAccumulator] = {}
    for name, (mod, fifo, shape) in targets.items():
        ls = state.layers[name]
        if ls.U is not None and ls.V is not None:
            accs[name] = _CrossAccumulator(ls.U.to(device), ls.V.to(device), fifo, cdtype)
    if not accs:
        raise ValueError("agl: estimate_cross_curvature: no layer of the state has both subspaces U and V "
                         "(estimate the state with subspaces=True)")

    handles = hook_layer_gradients([(targets[n][0], a.add) for n, a in accs.items()])
    count = tokens = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc="agl cross-curvature", unit="sample", total=max_samples)
    for ids, labels, ran in hooked_passes(net, batches, handles, bar, max_samples=max_samples, rank=0, world=1,
                                          pad_empty=False, device=device, fisher=fisher, seed=seed):
        if not ran:  # no labelled token in the sub-batch: zero gradients, its rows still count as samples
            for a in accs.values():
                a.rows.append(torch.zeros(len(ids), a.U.shape[1], a.V.shape[1], dtype=torch.float64, device=a.U.device))
        count += len(ids)
        tokens += _labelled_tokens(labels)
    if count == 0:
        raise ValueError("agl: estimate_cross_curvature: no samples (empty data, or max_samples=0)")
    for name, a in accs.items():
        C = torch.cat(a.rows) if a.rows else None
        if C is None or C.shape[0] != count:
            raise RuntimeError(f"agl: estimate_cross_curvature: layer {name!r} saw {0 if C is None else C.shape[0]} "
                               f"samples of {count} (is it used in the forward pass?)")
        state.layers[name].C = C.to(dtype)
    state.cross_samples = count
    state.cross_tokens = int(tokens)
    return state


# ------------------------------------------------------------------------------------------------- the penalty
def projected_updates(Ls: Sequence[Tensor], Rs: Sequence[Tensor], Us: Sequence[Tensor], Vs: Sequence[Tensor],
                      scales: Sequence[float]) -> Tensor:
    """The concatenated s_l · vec((U_lᵀ L_l)(R_l V_l)) over layers: (Σ_l k_l k'_l,), differentiable in L, R.
    L_l (m x r), R_l (r x n) are the update's factors in the weight's orientation (ΔW_l = s_l L_l R_l)."""
    parts = [(s * ((U.t() @ L) @ (R @ V))).reshape(-1) for L, R, U, V, s in zip(Ls, Rs, Us, Vs, scales)]
    return torch.cat(parts)


def cross_align_nats(Ls, Rs, Us, Vs, Cs, scales, num_tokens) -> Tensor:
    """Reference form of the penalty for a list of layers: ½ · (1/ΣT) · Σ_n z_n², z = C_cat @ m (module
    docstring); ``Cs`` (N, k_l, k'_l) per layer. Returns a 0-dim tensor."""
    return CrossCurvature(Us, Vs, Cs, num_tokens)(Ls, Rs, scales)[0]


class CrossCurvature:
    """The penalty for a fixed set of layers, its state tensors held once on the factors' device and dtype:
    ``C_cat`` (N, Σ k k'), the U_l, V_l. ``__call__(Ls, Rs, scales)`` -> (align_nats, z) with z (N,)."""

    def __init__(self, Us: Sequence[Tensor], Vs: Sequence[Tensor], Cs: Sequence[Tensor], num_tokens: int):
        if not num_tokens > 0:
            raise ValueError(f"agl: the cross curvature needs the labelled token count of its samples, got {num_tokens}")
        self._src = (list(Us), list(Vs), list(Cs))
        self.num_tokens = float(num_tokens)
        self._cache: Dict[tuple, tuple] = {}

    def _tensors(self, device, dtype):
        key = (str(device), dtype)
        hit = self._cache.get(key)
        if hit is None:
            Us, Vs, Cs = self._src
            conv = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
            C = torch.cat([c.reshape(c.shape[0], -1) for c in Cs], dim=1)
            hit = ([conv(u) for u in Us], [conv(v) for v in Vs], conv(C))
            self._cache.clear()
            self._cache[key] = hit
        return hit

    def __call__(self, Ls: Sequence[Tensor], Rs: Sequence[Tensor], scales: Sequence[float]):
        Us, Vs, C = self._tensors(Ls[0].device, Ls[0].dtype)
        z = C @ projected_updates(Ls, Rs, Us, Vs, scales)
        return 0.5 * (z * z).sum() / self.num_tokens, z
