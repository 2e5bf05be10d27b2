"""The AGL regulariser with the Fisher sharded by rows across ranks (FSDP2), and the collectives it needs.

Why it needs no new kernel: every term of a layer is a function of five grid sums S (docs/MATH.md §2), and row i of
ΔW = s·L·R depends only on row i of L. Rank k holds rows [r0, r1) of each layer's Fisher F (and task metric H) and
computes the partial sums of its rows from ``L[r0:r1], R, L_align[r0:r1], R_align``; one all-reduce of the (layers, 5)
partial sums gives the global sums, and only then are the terms formed:

    S = Σ_k S_k,   align = S0/N,  task = S1/N,  overlap = S2/N,  geodesic = S3²/(S0·S4 + eps)   (N = m·n)

so value and gradients equal the single-process ones up to the order of the float additions.

Each rank builds its own loss on the (replicated) terms; the gradient sent back into the rows is the mean over ranks of
the terms' gradients (one more all-reduce of a (layers, 4) matrix), the data-parallel objective DDP and FSDP2 use for
the task loss. So ``task_r + reg`` on every rank gives mean_r ∇task_r + ∇reg, the single-process gradient of
mean_r task_r + reg, and per-rank weights on the regulariser (``trainer_loss``) are averaged as under DDP.

Gradients: the LoRA factors are small, so each rank gathers them whole (FSDP2 shards them by rows too:
``_GatherRows``, one all-gather for all factors) and every rank computes the same replicated loss. The gradient a rank
gets for a whole factor covers only its own Fisher rows (all of A, its rows of L); the backward of the gather is a
reduce-scatter (SUM), so each rank's shard receives the sum over ranks, i.e. the whole gradient, exactly once.
Replicated (non-DTensor) factors, e.g. under DDP with a row-sharded state, get an all-reduce (SUM) instead.

Row blocks follow ``torch.chunk`` (as DTensor ``Shard(0)`` and FSDP2 do): ``ceil(m / world)`` rows per rank, the last
ranks possibly fewer or none (:func:`row_range`).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from agl.reference import agl_sums, terms_from_sums

__all__ = ["row_range", "is_dtensor", "fsdp2_group", "default_group", "ShardedTerms", "sq_norm", "rows_of"]


def row_range(m: int, rank: int, world: int) -> Tuple[int, int]:
    """Rows [r0, r1) of an m-row tensor that ``rank`` of ``world`` holds: ``torch.chunk`` blocks of ceil(m/world)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"agl: `rank` must be in [0, world) with world >= 1, got rank={rank}, world={world}")
    c = -(-int(m) // world)
    return min(m, rank * c), min(m, (rank + 1) * c)


def is_dtensor(t) -> bool:
    """True for a DTensor (an FSDP2 / tensor-parallel parameter)."""
    return type(t).__name__ == "DTensor" or (hasattr(t, "_spec") and hasattr(t, "_local_tensor"))


def fsdp2_group(p: Tensor, what: str):
    """The process group of an FSDP2 parameter ``p`` (a DTensor sharded by rows on a 1-D mesh); a clear error for
    any other layout (HSDP's 2-D mesh, tensor parallelism), which the row-sharded regulariser does not cover."""
    from torch.distributed.tensor import Shard

    mesh, placements = p.device_mesh, tuple(p.placements)
    if mesh.ndim != 1 or len(placements) != 1 or not (isinstance(placements[0], Shard) and placements[0].dim == 0):
        raise NotImplementedError(
            f"agl: {what} is a DTensor with placements {placements} on a {mesh.ndim}-D mesh; AGLLoss supports FSDP2 "
            "parameters sharded by rows on a 1-D mesh (fully_shard with the default mesh), not HSDP or tensor parallel"
        )
    return mesh.get_group()


def default_group():
    """The default process group when torch.distributed is initialised, else None."""
    return dist.group.WORLD if dist.is_available() and dist.is_initialized() else None


def sq_norm(w: Tensor) -> float:
    """‖w‖²_F in float64 for a plain tensor or an FSDP2 DTensor (local rows squared, then all-reduced)."""
    if not is_dtensor(w):
        return float(w.detach().to(torch.float64).square().sum())
    s = w.to_local().detach().to(torch.float64).square().sum().reshape(1)
    dist.all_reduce(s, group=w.device_mesh.get_group())
    return float(s)


def rows_of(state, name: str, r0: int, r1: int, rank: int, world: int) -> Tensor:
    """Rows [r0, r1) of layer ``name``'s Fisher from a whole :class:`AlignmentState` (sliced) or from a
    ``ShardedAlignmentState`` of this ``rank`` and ``world`` (its own rows); a clear error for a state sharded for
    another rank or world size."""
    held = getattr(state, "world_size", 1)
    if held == 1:
        return state.layers[name].fisher[r0:r1]
    if (state.rank, held) != (rank, world):
        raise ValueError(f"agl: the sharded state holds the rows of rank {state.rank} of {held}, but this process is "
                         f"rank {rank} of {world}; load it with ShardedAlignmentState.load(path) in this process group "
                         "to reshard it")
    if state.layer_rows(name) != (r0, r1):
        raise ValueError(f"agl: the sharded state holds rows {state.layer_rows(name)} of {name!r}, expected [{r0}, {r1})")
    return state.layers[name].fisher


# ---------------------------------------------------------------------------------------------- collectives
def _pad_rows(t: Tensor, rows: int) -> Tensor:
    return t if t.shape[0] == rows else torch.cat([t, t.new_zeros((rows - t.shape[0],) + tuple(t.shape[1:]))])


class _GatherRows(torch.autograd.Function):
    """Whole tensors from each rank's ``torch.chunk`` row block (one all-gather for all of them). Backward: the
    whole-tensor gradients are summed over ranks and each rank keeps its block (one reduce-scatter)."""

    @staticmethod
    def forward(ctx, group, full_rows: Sequence[int], *local: Tensor):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        chunks = [-(-m // world) for m in full_rows]
        ctx.group, ctx.full_rows, ctx.chunks = group, tuple(full_rows), chunks
        ctx.local_rows = [t.shape[0] for t in local]
        ctx.cols = [math.prod(t.shape[1:]) for t in local]
        ctx.tail = [tuple(t.shape[1:]) for t in local]
        ctx.dtype, ctx.device = local[0].dtype, local[0].device
        for t, m in zip(local, full_rows):  # the layout we assume is FSDP2's / DTensor's: check it, never guess
            r0, r1 = row_range(m, rank, world)
            if t.shape[0] != r1 - r0:
                raise RuntimeError(f"agl: a row shard has {t.shape[0]} rows, expected {r1 - r0} (rows [{r0}, {r1}) "
                                   f"of {m} on rank {rank} of {world}): not a torch.chunk row sharding")
        buf = torch.cat([_pad_rows(t.detach(), c).reshape(-1) for t, c in zip(local, chunks)])
        out = buf.new_empty(world * buf.numel())
        dist.all_gather_into_tensor(out, buf, group=group)
        out = out.view(world, -1)
        fulls, off = [], 0
        for m, c, k, tail in zip(full_rows, chunks, ctx.cols, ctx.tail):
            seg = out[:, off: off + c * k].reshape((world * c,) + tail)[:m]
            fulls.append(seg.clone())
            off += c * k
        return tuple(fulls)

    @staticmethod
    def backward(ctx, *grads):
        world = dist.get_world_size(ctx.group)
        parts = []
        for g, m, c, k, tail in zip(grads, ctx.full_rows, ctx.chunks, ctx.cols, ctx.tail):
            g = torch.zeros((m,) + tail, dtype=ctx.dtype, device=ctx.device) if g is None else g
            parts.append(_pad_rows(g.contiguous(), world * c).reshape(world, c * k))
        send = torch.cat(parts, dim=1).contiguous()
        recv = send.new_empty(send.shape[1])
        dist.reduce_scatter_tensor(recv, send.reshape(-1), op=dist.ReduceOp.SUM, group=ctx.group)
        out, off = [], 0
        for lr, c, k, tail in zip(ctx.local_rows, ctx.chunks, ctx.cols, ctx.tail):
            out.append(recv[off: off + c * k].reshape((c,) + tail)[:lr].clone())
            off += c * k
        return (None, None, *out)


class _SumGradsOverRanks(torch.autograd.Function):
    """Identity forward on replicated tensors; backward sums their gradients over ranks (one all-reduce)."""

    @staticmethod
    def forward(ctx, group, *ts: Tensor):
        ctx.group = group
        return tuple(t.view_as(t) for t in ts)

    @staticmethod
    def backward(ctx, *grads):
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=ctx.group)
        out, off = [], 0
        for g in grads:
            out.append(flat[off: off + g.numel()].view_as(g))
            off += g.numel()
        return (None, *out)


def _mean_over_ranks(g: Tensor, group) -> Tensor:
    """(1/W) Σ_ranks g: the gradient a rank passes back through the global sums (see :class:`_SumOverRanks`)."""
    g = g.contiguous().clone()
    dist.all_reduce(g, group=group)
    return g / dist.get_world_size(group)


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (SUM) of per-rank partial sums S_k. Each rank builds its own loss_r on the global sums S, and the
    data-parallel objective is the mean over ranks (what DDP and FSDP2 do to the task gradients): the gradient of S
    is then (1/W) Σ_r ∂loss_r/∂S, the same on every rank, and each rank sends it into its own rows. When every rank's
    loss has the same regulariser (AGLLoss.__call__), that is exactly ∂reg/∂S; with per-rank weights (trainer_loss
    with token counts) it is their mean, as under DDP."""

    @staticmethod
    def forward(ctx, group, S: Tensor):
        ctx.group = group
        S = S.clone()
        dist.all_reduce(S, group=group)
        return S

    @staticmethod
    def backward(ctx, g):
        return None, _mean_over_ranks(g, ctx.group)


def gather_whole(params: Sequence[Tensor], group) -> List[Tensor]:
    """The whole tensors of ``params`` (FSDP2 DTensors sharded by rows, or replicated plain tensors), differentiable;
    the gradient each rank sends back is summed over ranks (see the module docstring)."""
    out: List[Optional[Tensor]] = [None] * len(params)
    sharded = [i for i, p in enumerate(params) if is_dtensor(p)]
    plain = [i for i, p in enumerate(params) if not is_dtensor(p)]
    if sharded:
        fulls = _GatherRows.apply(group, [params[i].shape[0] for i in sharded], *[params[i].to_local() for i in sharded])
        for i, t in zip(sharded, fulls):
            out[i] = t
    if plain:
        for i, t in zip(plain, _SumGradsOverRanks.apply(group, *[params[i] for i in plain])):
            out[i] = t
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------- the terms
class _KernelRowTerms(torch.autograd.Function):
    """(layers, 4) terms from the fused op on each rank's rows: partial sums from one ``agl::terms_grouped_fwd`` call
    over the layers this rank holds rows of, one all-reduce, terms from the global sums. Backward: the terms'
    gradient averaged over ranks (as in :class:`_SumOverRanks`), then one ``agl::terms_grouped_bwd`` with the global
    sums on the rank's rows; the op divides the mean terms' gradients by its own N (rows × n), so they are rescaled
    by N_rows/N first (the geodesic term does not depend on N). Sums and terms are float64 when any layer has float64
    factors (on every rank alike: the all-reduce needs one dtype), else float32."""

    @staticmethod
    def _held(layers, factors):
        """Indices of the layers with rows on this rank, and their grouped-op inputs (lists, then the scales)."""
        idx = [i for i, lay in enumerate(layers) if lay[3]]
        lists = [[factors[4 * i + k] for i in idx] for k in range(4)]
        return idx, lists + [[layers[i][0] for i in idx], [layers[i][1] for i in idx]], [layers[i][4] for i in idx]

    @staticmethod
    def forward(ctx, group, layers, scalars, *factors: Optional[Tensor]):
        # layers: per layer (fisher rows, task-metric rows, N, rows held, scale); scalars: (beta, tau, sharpness, eps);
        # factors: 4 per layer (L rows, R, L_al rows, R_al)
        out = torch.float64 if any(f.dtype == torch.float64 for f in factors[0::4]) else torch.float32
        S = torch.zeros((len(layers), 5), dtype=out, device=factors[0].device)
        idx, (Ls, Rs, Las, Ras, Fs, Hs), scales = _KernelRowTerms._held(layers, factors)
        if idx:
            sums = torch.ops.agl.terms_grouped_fwd(Ls, Rs, Las, Ras, [], [], Fs, Hs, scales, *scalars)[1]
            S[idx] = sums.to(out)
        dist.all_reduce(S, group=group)
        ctx.save_for_backward(S, *[f for f in factors])
        ctx.layers, ctx.scalars, ctx.group = layers, scalars, group
        N = torch.tensor([lay[2] for lay in layers], dtype=S.dtype, device=S.device)
        return terms_from_sums(S, N, scalars[-1])

    @staticmethod
    def backward(ctx, grad_T):
        S, *factors = ctx.saved_tensors
        grad_T = _mean_over_ranks(grad_T, ctx.group)  # as _SumOverRanks: the ranks' losses averaged
        grads: List[Optional[Tensor]] = [None if f is None else torch.zeros_like(f) for f in factors]
        idx, (Ls, Rs, Las, Ras, Fs, Hs), scales = _KernelRowTerms._held(ctx.layers, factors)
        if idx:
            gt = grad_T[idx].to(S.dtype)
            share = [ctx.layers[i][3] * factors[4 * i + 1].shape[1] / ctx.layers[i][2] for i in idx]
            gt[:, :3] *= torch.tensor(share, dtype=S.dtype, device=S.device)[:, None]
            held = torch.ops.agl.terms_grouped_bwd(gt.contiguous(), S[idx].contiguous(), Ls, Rs, Las, Ras, [], [],
                                                   Fs, Hs, scales, *ctx.scalars)
            for j, i in enumerate(idx):
                for k in range(4):
                    if factors[4 * i + k] is not None:
                        grads[4 * i + k] = held[k][j]
        return (None, None, None, *grads)


class ShardedTerms:
    """The (layers, 4) term matrix of :class:`agl.AGLLoss` with this rank holding only its Fisher rows.

    ``entries``: AGLLoss's entries (name, binding, A, B, scaling); ``state``: an :class:`AlignmentState` (its rows
    are sliced here) or a :class:`agl.sharded_state.ShardedAlignmentState` of this group's rank and world size;
    ``task_state``: the same for the task Fisher H, or None (H = 1); ``subspaces``: use U / V (else L_al = R_al = 0).
    """

    def __init__(self, entries, state, task_state, config, group):
        self.entries, self.config, self.group = entries, config, group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self._rows = []  # per entry: (r0, r1, fisher rows, task-metric rows, U, V)
        for e in entries:
            m, n = e.binding.shape
            r0, r1 = row_range(m, self.rank, self.world)
            ls = state.layers[e.name]
            F = rows_of(state, e.name, r0, r1, self.rank, self.world)
            H = None if task_state is None else rows_of(task_state, e.name, r0, r1, self.rank, self.world)
            U, V = (ls.U, ls.V) if config.subspaces else (None, None)
            self._rows.append((r0, r1, F, H, U, V))
        self._cache = {}

    def _state_tensors(self, i: int, device, dtype):
        key = (i, str(device), dtype)
        hit = self._cache.get(key)
        if hit is None:
            conv = lambda t: None if t is None else t.to(device=device, dtype=dtype).contiguous()  # noqa: E731
            _, _, F, H, U, V = self._rows[i]
            hit = self._cache[key] = (conv(F), conv(H), conv(U), conv(V))
        return hit

    def term_matrix(self, backend: str) -> Tensor:
        """(layers, 4): ``align, task, overlap, geodesic`` as ``agl_terms`` returns them for the whole layer
        (per-element means over m·n, geodesic a squared cosine), float32 (float64 for float64 factors),
        identical on every rank, differentiable w.r.t. every rank's LoRA shards."""
        c = self.config
        whole = gather_whole([t for e in self.entries for t in (e.A, e.B)], self.group)
        per_layer, flat, sums = [], [], []
        for i, e in enumerate(self.entries):
            A, B = whole[2 * i], whole[2 * i + 1]
            L, R = (A.t(), B.t()) if e.binding.fan_in_fan_out else (B, A)  # weight orientation: ΔW = s · L @ R
            F, H, U, V = self._state_tensors(i, L.device, L.dtype)
            r0, r1 = self._rows[i][:2]
            Lr = L[r0:r1]
            L_al = Lr if U is None else U[r0:r1] @ (U.t() @ L)  # rows [r0, r1) of U (Uᵀ L)
            R_al = R if V is None else (R @ V) @ V.t()
            m, n = e.binding.shape
            if backend == "kernel":
                per_layer.append((F, H, m * n, r1 - r0, float(e.scaling)))
                flat += [Lr.contiguous(), R.contiguous(), L_al.contiguous(), R_al.contiguous()]
            else:
                sums.append(agl_sums(Lr, R, L_al, R_al, fisher=F, task_metric=H, scale=e.scaling, beta=c.beta,
                                     tau=c.tau, sharpness=c.sharpness))
        if backend == "kernel":
            scalars = tuple(float(v) for v in (c.beta, c.tau, c.sharpness, c.eps))
            T = _KernelRowTerms.apply(self.group, per_layer, scalars, *flat)
        else:
            S = _SumOverRanks.apply(self.group, torch.stack(sums))
            N = torch.tensor([e.numel for e in self.entries], dtype=S.dtype, device=S.device)
            T = terms_from_sums(S, N, c.eps)
        return T if T.dtype == torch.float64 else T.float()


def sharded_terms_for(entries, state, task_state, config) -> Optional[ShardedTerms]:
    """The row-sharded term matrix for ``AGLLoss`` when its LoRA factors are FSDP2 DTensors or its state is a
    ``ShardedAlignmentState`` of world size > 1; None when neither (the single-process path)."""
    dtensors = [(e, p) for e in entries for p in (e.A, e.B) if is_dtensor(p)]
    sharded_state = any(getattr(s, "world_size", 1) > 1 for s in (state, task_state) if s is not None)
    if not dtensors and not sharded_state:
        return None
    if dtensors:
        if len(dtensors) != 2 * len(entries):
            e = next(e for e in entries if not (is_dtensor(e.A) and is_dtensor(e.B)))
            raise NotImplementedError(f"agl: some LoRA factors are FSDP2 DTensors and some are not ({e.name!r} is "
                                      "not): apply fully_shard to every module that holds LoRA layers")
        groups = {id(g): g for g in (fsdp2_group(p, f"{e.name} ({e.adapter})") for e, p in dtensors)}
        if len(groups) != 1:
            raise NotImplementedError("agl: the LoRA factors are sharded over different process groups; AGLLoss needs "
                                      "one FSDP2 mesh for all of them")
        group = next(iter(groups.values()))
    else:
        group = default_group()
        if group is None:
            raise ValueError("agl: the alignment state is sharded (ShardedAlignmentState with world_size > 1) but "
                             "torch.distributed is not initialised; load it with ShardedAlignmentState.load(path) in "
                             "one process to get the whole state")
    return ShardedTerms(entries, state, task_state, config, group)
