"""Fisher estimation on an FSDP2 model with the Fisher kept by rows: what ``estimate_alignment_state`` uses when the
hooked weights are DTensors.

Samples are split across ranks as under DDP (sample j on rank j % world). In each backward, every layer's hook forms
this rank's contribution for that one layer, F_k = Σ_{i on rank k} G_i ⊙ G_i (m x n, float64), and at once
reduce-scatters it by rows: rank k keeps rows [r0, r1) = ``row_range(m, k, world)`` of Σ_k F_k and the whole
contribution is freed, so no rank holds a whole layer's Fisher for longer than one hook (nor more than one layer's at
a time). The second moments S_out (m x m) and S_in (n x n) are reduced to the layer's owner rank (layer index mod
world), which alone computes U and V (``eigh``, the cost of estimation on wide layers) and broadcasts them; so the
eigendecompositions are spread over the ranks. Every rank runs every batch (a rank without samples in a batch runs
one sample with no labelled token, contributing zeros), because FSDP2's all-gathers and these hooks are collectives.

The result equals the single-process state (its row blocks concatenated) up to the order of float additions.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from agl.distributed import row_range
from agl.sharded_state import ShardedAlignmentState
from agl.state import LayerState

__all__ = ["RowShardedAccumulator", "finish_sharded"]


class RowShardedAccumulator:
    """One layer's running sums on one rank: its Fisher rows (float64), and S_out / S_in on the owner rank only.

    ``new_local``: builds the single-process accumulator of the layer (``agl.fisher._Accumulator``), used for each
    backward's whole-layer contribution; ``index``: the layer's position (its owner is ``index % world``)."""

    def __init__(self, new_local: Callable[[], object], shape: Sequence[int], index: int, group, device):
        self.new_local, self.group = new_local, group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        m, n = int(shape[0]), int(shape[1])
        self.shape = (m, n)
        self.rows = row_range(m, self.rank, self.world)
        self.chunk = -(-m // self.world)
        self.F = torch.zeros(self.rows[1] - self.rows[0], n, dtype=torch.float64, device=device)
        self.owner = index % self.world
        self.S_out: Optional[Tensor] = None
        self.S_in: Optional[Tensor] = None

    def add_from_activations(self, delta: Tensor, X: Tensor, fan_in_fan_out: bool, chunk_elems: int) -> None:
        """The single-process accumulator's ``add_from_activations`` on this rank's samples, then the collectives."""
        local = self.new_local()
        local.add_from_activations(delta, X, fan_in_fan_out, chunk_elems)
        self._reduce(local)

    def _reduce(self, local) -> None:
        m, n = self.shape
        F = local.F
        if self.world * self.chunk != m:  # reduce_scatter_tensor needs equal blocks: pad the last rank's
            F = torch.cat([F, F.new_zeros(self.world * self.chunk - m, n)])
        mine = F.new_empty(self.chunk, n)
        dist.reduce_scatter_tensor(mine, F.contiguous(), op=dist.ReduceOp.SUM, group=self.group)
        self.F += mine[: self.F.shape[0]]
        del F, mine
        local.F = None
        if local.S_out is None:
            return
        dst = dist.get_global_rank(self.group, self.owner)
        for key in ("S_out", "S_in"):
            S = getattr(local, key)
            dist.reduce(S, dst=dst, op=dist.ReduceOp.SUM, group=self.group)
            if self.rank == self.owner:
                acc = getattr(self, key)
                setattr(self, key, S if acc is None else acc.add_(S))


def finish_sharded(accs: Dict[str, RowShardedAccumulator], count: int, tokens: int, *, energy: float, max_rank: int,
                   subspaces: bool, keep_moments: bool, dtype: torch.dtype, options: dict, group,
                   top_eigvecs: Callable[[Tensor, float, int], Optional[Tensor]]) -> ShardedAlignmentState:
    """The rank's :class:`ShardedAlignmentState`: Fisher rows / count normalised by the global mean (one all-reduce
    of the row sums), U / V from each layer's owner (``top_eigvecs``, as in one process) broadcast to all.
    With ``keep_moments`` only the owner keeps a layer's S_out / S_in (the others hold None)."""
    if count == 0:
        raise ValueError("agl: no samples reached the Fisher estimate (empty data, or max_samples=0)")
    device = next(iter(accs.values())).F.device
    total = torch.stack([a.F.sum() for a in accs.values()]).sum().reshape(1)
    dist.all_reduce(total, group=group)
    total_numel = sum(a.shape[0] * a.shape[1] for a in accs.values())
    raw_mean = float(total) / count / total_numel
    if not raw_mean > 0:
        raise ValueError("agl: the alignment Fisher is zero in every layer: no token carried a loss (are all labels "
                         "-100?) or the targets do not influence the output")
    rank = dist.get_rank(group)
    layers, shapes = {}, {}
    for name, a in accs.items():
        U = V = S_out = S_in = None
        if subspaces:
            if rank == a.owner:
                S_out, S_in = a.S_out / count, a.S_in / count
                U, V = top_eigvecs(S_out, energy, max_rank), top_eigvecs(S_in, energy, max_rank)
            U = _broadcast_optional(U, a.shape[0], a.owner, group, device)
            V = _broadcast_optional(V, a.shape[1], a.owner, group, device)
            U = None if U is None else U.to(dtype)
            V = None if V is None else V.to(dtype)
        if not keep_moments:
            S_out = S_in = None
        layers[name] = LayerState((a.F / count / raw_mean).to(dtype), U, V, S_out, S_in)
        shapes[name] = a.shape
        a.F = None  # the accumulator's rows are not kept twice
    return ShardedAlignmentState(layers, count, raw_mean, options, int(tokens), rank=rank,
                                 world_size=dist.get_world_size(group), shapes=shapes)


def _broadcast_optional(t: Optional[Tensor], rows: int, owner: int, group, device) -> Optional[Tensor]:
    """``t`` (rows x k, float64, or None) from rank ``owner`` to every rank of ``group``."""
    src = dist.get_global_rank(group, owner)
    k = torch.tensor([-1 if t is None else t.shape[1]], dtype=torch.int64, device=device)
    dist.broadcast(k, src=src, group=group)
    if int(k) < 0:
        return None
    if t is None:
        t = torch.empty(rows, int(k), dtype=torch.float64, device=device)
    t = t.contiguous()
    dist.broadcast(t, src=src, group=group)
    return t
