"""Alignment Fisher estimation from per-sample gradients, via forward/backward hooks.

For every target layer with frozen base weight W0 (m x n, out x in) and every sample i, the per-sample gradient of
that sample's *summed* token loss is G_i = sum_t delta_{i,t} x_{i,t}^T, where x are the layer's inputs and delta the
gradients of the layer's output (for a peft LoRA layer, the output of the LoRA layer: base + LoRA, so delta is exactly
d loss / d (W0 x)). One forward and one backward per batch give all of them; the per-sample products are taken in
chunks so memory stays bounded. We accumulate

    F = mean_i G_i * G_i        S_out = mean_i G_i G_i^T  (m x m)        S_in = mean_i G_i^T G_i  (n x n)

then U / V = top eigenvectors (float64 ``eigh``) of S_out / S_in, the fewest reaching ``energy`` of the trace, capped
at ``max_rank``, and finally divide every layer's F by the mean of F over all layers (global mean 1; the divisor is
``state.fisher_scale``). The labelled tokens are counted too (``state.num_tokens``): F · fisher_scale / (tokens per
sample) is the Fisher of the token-averaged loss, the unit ``AGLLoss`` reports nats in (``state.nats_scale``).

No ``W0.grad`` is computed: all parameters are frozen during estimation and the hooks make each target's output a
differentiable leaf when nothing upstream requires grad. Under ``torch.distributed`` (DDP, gloo or nccl), samples are
split across ranks by global index (sample j goes to rank j % world) and the sums are all-reduced, so N samples on k
ranks give the single-process state up to float rounding. On an FSDP2 model (DTensor weights) the same split is used
and each layer's F is reduce-scattered by rows in its hook instead: each rank gets its rows of the state
(``agl.sharded_fisher``).
"""
from __future__ import annotations

import functools
from typing import Dict, Iterable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from agl.distributed import fsdp2_group, is_dtensor
from agl.per_sample import (_Frozen, _compute_dtype, _dist_info, _forward_logits, _labelled_tokens, _labels_of,  # noqa: F401
                            _model_device, _iter_samples, hook_layer_gradients, hooked_passes, per_sample_losses)
from agl.peft_binding import resolve_targets, unwrap_model
from agl.state import AlignmentState, LayerState

__all__ = [
    "AlignmentState",
    "LayerState",
    "estimate_alignment_state",
    "estimate_alignment_state_loop",
    "per_sample_losses",
]

_CHUNK_ELEMS = 1 << 24  # per-sample gradient elements materialised at once (64 MiB in float32)
_MOMENTS_VIA_TOKENS = None  # None: pick the cheaper way to form S_out / S_in; True / False force it (tests)


class _Accumulator:
    """Running sums of G_i^2, G_i G_i^T and G_i^T G_i for one layer (float64)."""

    def __init__(self, shape, device, subspaces: bool, compute_dtype: torch.dtype):
        m, n = shape
        self.shape = (m, n)
        self.compute_dtype = compute_dtype
        self.F = torch.zeros(m, n, dtype=torch.float64, device=device)
        self.S_out = torch.zeros(m, m, dtype=torch.float64, device=device) if subspaces else None
        self.S_in = torch.zeros(n, n, dtype=torch.float64, device=device) if subspaces else None

    def add(self, G: Tensor) -> None:
        """Add a stack of per-sample gradients G (c, m, n)."""
        c, m, n = G.shape
        self.F += G.square().sum(0).to(torch.float64)
        if self.S_out is not None:
            rows = G.permute(1, 0, 2).reshape(m, c * n)
            self.S_out += (rows @ rows.T).to(torch.float64)
            cols = G.reshape(c * m, n)
            self.S_in += (cols.T @ cols).to(torch.float64)

    def add_from_activations(self, delta: Tensor, X: Tensor, fan_in_fan_out: bool, chunk_elems: int) -> None:
        """delta (b, T, out), X (b, T, in) -> G_i = delta_i^T X_i (out x in), or its transpose for fan_in_fan_out.

        With R the factor indexing G's rows and C its columns (G_i = R_i^T C_i), the second moments are taken in
        whichever order is cheaper: from G (rows^2 cols + rows cols^2 per sample) or through the T x T token Gram
        matrices, S_rows = sum_i R_i^T (C_i C_i^T) R_i, S_cols = sum_i C_i^T (R_i R_i^T) C_i (~2 T^2 (rows + cols)
        + T (rows^2 + cols^2)), which wins for sequences shorter than the layer's width."""
        if delta.dim() == 2:
            delta, X = delta.unsqueeze(1), X.unsqueeze(1)
        elif delta.dim() > 3:
            delta, X = delta.flatten(1, -2), X.flatten(1, -2)
        R, C = (X, delta) if fan_in_fan_out else (delta, X)
        R = R.to(self.compute_dtype)
        C = C.to(self.compute_dtype)
        m, n = self.shape
        T = R.shape[1]
        via_tokens = self.S_out is not None and (
            _MOMENTS_VIA_TOKENS if _MOMENTS_VIA_TOKENS is not None
            else 2 * T * T * (m + n) + T * (m * m + n * n) < m * n * (m + n))
        step = max(1, chunk_elems // max(m * n, T * T))
        for s in range(0, R.shape[0], step):
            r, c = R[s : s + step], C[s : s + step]
            G = torch.bmm(r.transpose(1, 2), c)  # (b, m, n)
            if not via_tokens:
                self.add(G)
                continue
            self.F += G.square().sum(0).to(torch.float64)
            del G
            b = r.shape[0]
            Kc = torch.bmm(c, c.transpose(1, 2))  # (b, T, T)
            self.S_out += (r.reshape(b * T, m).T @ torch.bmm(Kc, r).reshape(b * T, m)).to(torch.float64)
            Kr = torch.bmm(r, r.transpose(1, 2))
            self.S_in += (c.reshape(b * T, n).T @ torch.bmm(Kr, c).reshape(b * T, n)).to(torch.float64)


def _add_activations(acc: "_Accumulator", fifo: bool, chunk_elems: int, delta: Tensor, X: Tensor) -> None:
    acc.add_from_activations(delta, X, fifo, chunk_elems)


def _finish(
    accs: Dict[str, _Accumulator],
    count: int,
    *,
    energy: float,
    max_rank: int,
    subspaces: bool,
    keep_moments: bool,
    dtype: torch.dtype,
    options: dict,
    dist=None,
    tokens: int = 0,
) -> AlignmentState:
    if count == 0:
        raise ValueError("agl: no samples reached the Fisher estimate (empty data, or max_samples=0)")
    total_sum = sum(float(a.F.sum()) for a in accs.values())
    total_numel = sum(a.F.numel() for a in accs.values())
    raw_mean = total_sum / count / total_numel
    if not raw_mean > 0:
        raise ValueError(
            "agl: the alignment Fisher is zero in every layer: no token carried a loss (are all labels -100?) or the "
            "targets do not influence the output"
        )
    layers = {}
    for name, a in accs.items():
        F = (a.F / count / raw_mean).to(dtype)
        U = V = S_out = S_in = None
        if subspaces:
            S_out, S_in = a.S_out / count, a.S_in / count
            U = _top_eigvecs(S_out, energy, max_rank)
            V = _top_eigvecs(S_in, energy, max_rank)
            if dist is not None:  # identical subspaces on every rank, whatever eigh's rounding
                for t in (U, V):
                    if t is not None:
                        dist.broadcast(t, src=0)
            U = None if U is None else U.to(dtype)
            V = None if V is None else V.to(dtype)
        if not keep_moments:
            S_out = S_in = None
        layers[name] = LayerState(F, U, V, S_out, S_in)
    return AlignmentState(layers, count, raw_mean, options, int(tokens))


def _top_eigvecs(S: Tensor, energy: float, max_rank: int) -> Optional[Tensor]:
    """Eigenvectors of the symmetric PSD ``S`` (float64) for the largest eigenvalues: the fewest whose eigenvalues
    reach ``energy`` of the trace, at most ``max_rank``; None when S is zero."""
    w, Q = torch.linalg.eigh(S.to(torch.float64))
    w, Q = w.flip(0).clamp_min(0), Q.flip(1)
    total = w.sum()
    if not total > 0:
        return None
    frac = torch.cumsum(w, 0) / total
    k = int(torch.searchsorted(frac, torch.tensor(energy, dtype=frac.dtype, device=frac.device) - 1e-12)) + 1
    k = max(1, min(k, max_rank, S.shape[0]))
    return Q[:, :k].contiguous()


def _check_options(fisher: str, energy: float, max_rank: int, max_samples) -> None:
    if fisher not in ("empirical", "true"):
        raise ValueError(f"agl: `fisher` must be 'empirical' (labels from the data) or 'true' (sampled labels), got {fisher!r}")
    if not 0.0 < float(energy) <= 1.0:
        raise ValueError(f"agl: `energy` must be in (0, 1], got {energy}")
    if int(max_rank) < 1:
        raise ValueError(f"agl: `max_rank` must be >= 1, got {max_rank}")
    if max_samples is not None and int(max_samples) < 1:
        raise ValueError(f"agl: `max_samples` must be >= 1 or None, got {max_samples}")


def estimate_alignment_state(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    *,
    modules: Optional[Sequence[str]] = None,
    fisher: str = "empirical",
    max_samples: Optional[int] = None,
    energy: float = 0.9,
    max_rank: int = 64,
    subspaces: bool = True,
    keep_moments: bool = False,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    seed: int = 0,
    split_across_ranks: bool = True,
    chunk_elems: int = _CHUNK_ELEMS,
    cross_curvature: bool = False,
) -> AlignmentState:
    """Estimate the alignment Fisher and subspaces of ``model`` on ``batches``; returns an :class:`AlignmentState`.

    ``batches``: iterable of dicts as a HF causal LM takes them: ``input_ids`` (b, T), ``attention_mask`` (b, T),
    ``labels`` (b, T) with -100 on prompt and pad tokens (if absent: ``input_ids`` on attended tokens).
    ``modules``: qualified names of the layers (peft LoRA layers, whose base layer is hooked, or ``nn.Linear``);
    default every peft LoRA layer. ``fisher``: ``"empirical"`` (data labels) or ``"true"`` (labels sampled from the
    model at the labelled positions, per-sample seeded by ``seed``). ``energy``/``max_rank``: subspace rule.
    ``subspaces=False`` skips S_out/S_in (U = V = None). ``keep_moments`` keeps S_out, S_in in the state (not saved).
    ``dtype``: dtype of the returned tensors (accumulation is float64). ``split_across_ranks``: under an initialised
    ``torch.distributed``, each rank processes samples j with j % world == rank (set False when the data is already
    sharded per rank; the sums are all-reduced either way).
    On an FSDP2 model (``fully_shard``: DTensor weights) it returns this rank's
    :class:`agl.sharded_state.ShardedAlignmentState` (its rows of every Fisher; see ``agl.sharded_fisher``); every
    rank must then run the same number of batches (with ``split_across_ranks=False``, the same number per rank).
    The model is put in eval mode with frozen parameters during estimation and restored afterwards.
    ``cross_curvature``: also store the per-sample gradients projected on the subspaces (``C``, what
    ``AGLConfig(curvature="cross")`` needs) by a second pass over the same ``batches`` once U and V are known
    (``agl.curvature.estimate_cross_curvature``; ``batches`` must then be re-iterable, e.g. a list; single process).
    """
    _check_options(fisher, energy, max_rank, max_samples)
    if cross_curvature and not subspaces:
        raise ValueError("agl: `cross_curvature=True` needs `subspaces=True` (C is the gradient projected on U and V)")
    if cross_curvature and iter(batches) is batches:
        raise ValueError("agl: `cross_curvature=True` reads `batches` twice: pass a list (or another re-iterable), "
                         "not an iterator or generator")
    net = unwrap_model(model)
    targets = resolve_targets(net, modules)
    dist, rank, world = _dist_info()
    if cross_curvature and world > 1:  # checked before the Fisher pass, not after it
        raise NotImplementedError(f"agl: `cross_curvature=True` runs in a single process (here world size {world}: "
                                  "its per-sample rows are not gathered across ranks); estimate the state on an "
                                  "unsharded model in one process and load it whole on every rank")
    split_rank, split_world = (rank, world) if (dist is not None and split_across_ranks) else (0, 1)
    device = _model_device(net)
    cdtype = _compute_dtype(net)
    accs: Dict[str, _Accumulator] = {}
    fsdp2 = None  # the FSDP2 process group when the hooked weights are DTensors: the Fisher is then kept by rows
    for index, (name, (mod, fifo, shape)) in enumerate(targets.items()):
        w = getattr(mod, "weight", None)
        if w is not None and is_dtensor(w):
            fsdp2 = fsdp2_group(w, f"the weight of {name!r}")
            from agl.sharded_fisher import RowShardedAccumulator

            new_local = functools.partial(_Accumulator, shape, device, subspaces, cdtype)
            accs[name] = RowShardedAccumulator(new_local, shape, index, fsdp2, device)
            continue
        if w is not None and (w.numel() == 0 or type(w).__name__ == "FlatParameter" or hasattr(w, "ds_id")):
            raise NotImplementedError(
                f"agl: the weight of {name!r} is sharded by FSDP1 or DeepSpeed ZeRO-3, which agl does not support; "
                "shard the model with FSDP2 (fully_shard; the state is then estimated and kept by rows), or estimate "
                "on an unsharded model (DDP or a single process)"
            )
        accs[name] = _Accumulator(shape, device, subspaces, cdtype)
    if fsdp2 is not None and len({type(a) for a in accs.values()}) != 1:
        raise NotImplementedError("agl: some hooked weights are FSDP2 DTensors and some are not; fully_shard every "
                                  "decoder layer (and the root) before estimating")
    if fsdp2 is not None:
        split_rank, split_world = (dist.get_rank(fsdp2), dist.get_world_size(fsdp2)) if split_across_ranks else (0, 1)

    handles = hook_layer_gradients(
        [(mod, functools.partial(_add_activations, accs[name], fifo, chunk_elems)) for name, (mod, fifo, _) in targets.items()])
    count = tokens = 0
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        total = max_samples
        if isinstance(batches, (list, tuple)):
            n_all = sum(int(b["input_ids"].shape[0]) for b in batches if "input_ids" in b)
            total = n_all if max_samples is None else min(n_all, max_samples)
        bar = tqdm(total=total, desc="agl fisher", unit="sample")
    for ids, labels, _ in hooked_passes(net, batches, handles, bar, max_samples=max_samples, rank=split_rank,
                                        world=split_world, pad_empty=fsdp2 is not None, device=device, fisher=fisher,
                                        seed=seed):
        count += len(ids)
        tokens += _labelled_tokens(labels)
    if dist is not None:
        count_t = torch.tensor([float(count), float(tokens)], dtype=torch.float64, device=device)
        dist.all_reduce(count_t)
        count, tokens = (int(round(v)) for v in count_t.tolist())
        for a in (accs.values() if fsdp2 is None else ()):  # row-sharded sums were reduced in the hooks
            for t in (a.F, a.S_out, a.S_in):
                if t is not None:
                    dist.all_reduce(t)
    options = {
        "fisher": fisher, "energy": float(energy), "max_rank": int(max_rank), "max_samples": max_samples,
        "modules": list(targets), "subspaces": bool(subspaces), "seed": int(seed), "world_size": int(world),
    }
    if fsdp2 is not None:
        from agl.sharded_fisher import finish_sharded

        return finish_sharded(accs, count, tokens, energy=energy, max_rank=max_rank, subspaces=subspaces,
                              keep_moments=keep_moments, dtype=dtype, options=options, top_eigvecs=_top_eigvecs,
                              group=fsdp2)
    state = _finish(accs, count, energy=energy, max_rank=max_rank, subspaces=subspaces, keep_moments=keep_moments,
                    dtype=dtype, options=options, dist=dist, tokens=tokens)
    if cross_curvature:
        from agl.curvature import estimate_cross_curvature

        estimate_cross_curvature(model, batches, state, modules=list(targets), fisher=fisher,
                                 max_samples=max_samples, seed=seed, progress=progress, dtype=dtype)
        state.options["cross_curvature"] = True
    return state


def estimate_alignment_state_loop(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    *,
    modules: Optional[Sequence[str]] = None,
    max_samples: Optional[int] = None,
    energy: float = 0.9,
    max_rank: int = 64,
    subspaces: bool = True,
    keep_moments: bool = False,
    dtype: torch.dtype = torch.float32,
) -> AlignmentState:
    """Brute-force reference (empirical Fisher): one forward/backward per sample, squaring each ``W0.grad``.

    Slow by design; the tests check :func:`estimate_alignment_state` against it and ``bench/bench_fisher.py`` times
    both. Single process only."""
    _check_options("empirical", energy, max_rank, max_samples)
    net = unwrap_model(model)
    targets = resolve_targets(net, modules)
    device = _model_device(net)
    cdtype = _compute_dtype(net)
    accs = {name: _Accumulator(tuple(mod.weight.shape), device, subspaces, cdtype) for name, (mod, _, _) in targets.items()}
    count = tokens = 0
    with _Frozen(net), torch.enable_grad():
        for mod, _, _ in targets.values():
            mod.weight.requires_grad_(True)
        for sub, ids, _ in _iter_samples(batches, max_samples, 0, 1):
            for row in range(len(ids)):
                one = {k: (v[row : row + 1] if isinstance(v, Tensor) and v.dim() > 0 else v) for k, v in sub.items()}
                for mod, _, _ in targets.values():
                    mod.weight.grad = None
                logits = _forward_logits(net, one, device)
                labels = _labels_of(one).to(device)
                loss = per_sample_losses(logits, labels).sum()
                loss.backward()
                tokens += _labelled_tokens(labels)
                for name, (mod, _, _) in targets.items():
                    g = mod.weight.grad
                    g = torch.zeros_like(mod.weight) if g is None else g
                    accs[name].add(g.to(cdtype).unsqueeze(0))
                count += 1
        for mod, _, _ in targets.values():
            mod.weight.grad = None
    options = {"fisher": "empirical", "energy": float(energy), "max_rank": int(max_rank), "max_samples": max_samples,
               "modules": list(targets), "subspaces": bool(subspaces), "method": "loop"}
    return _finish(accs, count, energy=energy, max_rank=max_rank, subspaces=subspaces, keep_moments=keep_moments,
                   dtype=dtype, options=options, tokens=tokens)
