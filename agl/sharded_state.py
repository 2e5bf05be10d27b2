"""``ShardedAlignmentState``: this rank's rows of every layer's Fisher (FSDP2), saved as one safetensors file per rank.

Each rank holds rows [r0, r1) = ``agl.distributed.row_range(m, rank, world)`` of every layer's Fisher (m x n, the
base weight's orientation) and the whole U (m x k) and V (n x k'), which are small. The memory of the Fisher per
rank is 1/world of the whole.

On disk (a directory)::

    manifest.json                       written last, by rank 0, once every other file is complete
    fisher-00000-of-00002.safetensors   "<layer>/fisher": the rows rank 0 held
    fisher-00001-of-00002.safetensors
    subspaces.safetensors               "<layer>/U", "<layer>/V" (written once, by rank 0)

``manifest.json``: ``{"format": "agl.alignment_state.sharded", "version": 1, "world_size": W, "names": [...],
"layers": {name: {"shape": [m, n], "rank_U": k|null, "rank_V": k'|null}}, "num_samples", "num_tokens",
"fisher_scale", "fisher_dtype", "options", "subspaces": {"file", "sha256": {tensor: hex}}, "shards": [{"file",
"rank", "rows": {name: [r0, r1]}, "sha256": {tensor: hex}}]}``; the digests are :func:`agl.state.tensor_digest` of
each tensor as stored, verified on load (streamed in row blocks, so no rank reads a whole layer at once).

Why safetensors files and a JSON manifest rather than ``torch.distributed.checkpoint``: loading never unpickles (DCP's
``.metadata`` is a pickle, and ``AlignmentState`` promises never to unpickle), a single process loads it with nothing
but safetensors (no process group, no DCP planner), every byte is covered by the same sha256 scheme as
``AlignmentState``, and resharding is a row-range intersection: a rank reads, memory-mapped, only the row blocks of
the files that overlap its new rows. ``load`` reshards to any world size, reads a whole-state file too, and in a
single process returns the whole state.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from agl._io import atomic_output, atomic_write_json
from agl.distributed import default_group, row_range
from agl.state import STATE_FILENAME, AlignmentState, LayerState, stream_digest, tensor_digest

__all__ = ["ShardedAlignmentState", "MANIFEST"]

MANIFEST = "manifest.json"
SUBSPACES = "subspaces.safetensors"
_FORMAT = "agl.alignment_state.sharded"
_VERSION = 1
_READ_ROWS_BYTES = 1 << 26  # rows read (and hashed) at once when loading: 64 MiB


def _shard_file(rank: int, world: int) -> str:
    return f"fisher-{rank:05d}-of-{world:05d}.safetensors"


def _rank_world(rank: Optional[int], world_size: Optional[int], group=None) -> Tuple[int, int]:
    g = group if group is not None else default_group()
    r = rank if rank is not None else (dist.get_rank(g) if g is not None else 0)
    w = world_size if world_size is not None else (dist.get_world_size(g) if g is not None else 1)
    row_range(1, r, w)  # validates
    return int(r), int(w)


@dataclass
class ShardedAlignmentState(AlignmentState):
    """An :class:`AlignmentState` whose ``layers[name].fisher`` holds only rows ``layer_rows(name)`` of the layer's
    Fisher; ``shapes[name]`` is the whole (m, n). U and V are whole. ``AGLLoss`` takes it directly (under FSDP2 each
    rank passes its own); with ``world_size == 1`` it is a whole state."""

    rank: int = 0
    world_size: int = 1
    shapes: Dict[str, Tuple[int, int]] = field(default_factory=dict)

    def __repr__(self) -> str:
        return (f"ShardedAlignmentState({len(self.layers)} layers, {self.num_samples} samples, rank {self.rank} of "
                f"{self.world_size})")

    def layer_rows(self, name: str) -> Tuple[int, int]:
        """Rows [r0, r1) of layer ``name``'s Fisher that this rank holds."""
        return row_range(self.shapes[name][0], self.rank, self.world_size)

    # ------------------------------------------------------------------ building
    @classmethod
    def shard(cls, state: AlignmentState, rank: Optional[int] = None, world_size: Optional[int] = None,
              ) -> "ShardedAlignmentState":
        """This rank's rows of a whole ``state`` (copies: the whole one can be freed). ``rank``/``world_size``
        default to the initialised default process group (else 0 of 1)."""
        if isinstance(state, ShardedAlignmentState) and state.world_size != 1:
            raise ValueError("agl: `state` is already sharded; gather() it or load it again to reshard")
        rank, world = _rank_world(rank, world_size)
        layers, shapes = {}, {}
        for name, ls in state.layers.items():
            m, n = ls.shape
            r0, r1 = row_range(m, rank, world)
            layers[name] = LayerState(ls.fisher[r0:r1].clone(), ls.U, ls.V)
            shapes[name] = (m, n)
        return cls(layers, state.num_samples, state.fisher_scale, dict(state.options), state.num_tokens,
                   rank=rank, world_size=world, shapes=shapes)

    def gather(self, group=None) -> AlignmentState:
        """The whole state on every rank (a collective over ``group``, default the world): rows all-gathered."""
        g = group if group is not None else default_group()
        layers = {}
        for name, ls in self.layers.items():
            m, n = self.shapes[name]
            if self.world_size == 1:
                F = ls.fisher
            else:
                c = -(-m // self.world_size)
                buf = torch.zeros(c, n, dtype=ls.fisher.dtype, device=ls.fisher.device)
                buf[: ls.fisher.shape[0]] = ls.fisher
                out = buf.new_empty(self.world_size * c, n)
                dist.all_gather_into_tensor(out, buf, group=g)
                F = out[:m].clone()
            layers[name] = LayerState(F, ls.U, ls.V)
        return AlignmentState(layers, self.num_samples, self.fisher_scale, dict(self.options), self.num_tokens)

    def fisher_bytes(self) -> int:
        """Bytes of the Fisher rows this rank holds."""
        return sum(ls.fisher.numel() * ls.fisher.element_size() for ls in self.layers.values())

    def check(self, model, layers=None) -> None:
        """:meth:`AlignmentState.check` against the whole shapes (the rows held are checked too)."""
        view = {}
        for name, ls in self.layers.items():
            m, n = self.shapes[name]
            r0, r1 = self.layer_rows(name)
            if tuple(ls.fisher.shape) != (r1 - r0, n):
                raise ValueError(f"agl: sharded state layer {name!r} holds a {tuple(ls.fisher.shape)} Fisher block, "
                                 f"expected rows [{r0}, {r1}) of {m} x {n}")
            view[name] = LayerState(torch.empty(m, n, device="meta"), ls.U, ls.V)
        AlignmentState(view).check(model, layers)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str, *, fisher_dtype: torch.dtype = torch.float32, group=None) -> str:
        """Write this rank's rows to ``path`` (a directory); a collective over ``group`` (every rank calls it).
        Rank 0 writes U / V and, after every rank's file is complete, ``manifest.json`` (so a manifest always
        describes complete files), then removes shard files of an earlier save at another world size.
        Returns the manifest's path."""
        from safetensors.torch import save_file

        if fisher_dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise ValueError(f"agl: `fisher_dtype` must be float32, bfloat16, float16 or float64, got {fisher_dtype}")
        g = group if group is not None else default_group()
        if self.world_size > 1 and (g is None or dist.get_world_size(g) != self.world_size
                                    or dist.get_rank(g) != self.rank):
            raise ValueError(f"agl: this state is rank {self.rank} of {self.world_size}; save it from that rank of an "
                             "initialised process group of that size (every rank calls save)")
        os.makedirs(path, exist_ok=True)
        for name in self.layers:
            if "/" in name:
                raise ValueError(f"agl: layer name {name!r} contains '/', which the file format reserves")
        fisher = {f"{n}/fisher": ls.fisher.detach().to("cpu", fisher_dtype).contiguous() for n, ls in self.layers.items()}
        my_file = _shard_file(self.rank, self.world_size)
        with atomic_output(os.path.join(path, my_file)) as tmp:
            save_file(fisher, str(tmp), metadata={"agl": json.dumps({"format": _FORMAT + ".shard", "rank": self.rank,
                                                                      "world_size": self.world_size})})
        mine = {"file": my_file, "rank": self.rank,
                "rows": {n: list(self.layer_rows(n)) for n in self.layers},
                "sha256": {k: tensor_digest(k, t) for k, t in fisher.items()}}
        shards: List[Optional[dict]] = [None] * self.world_size
        if self.world_size > 1:
            dist.all_gather_object(shards, json.dumps(mine), group=g)
            shards = [json.loads(s) for s in shards]
        else:
            shards = [mine]
        target = os.path.join(path, MANIFEST)
        if self.rank == 0:
            sub = {}
            for n, ls in self.layers.items():
                for key in ("U", "V"):
                    t = getattr(ls, key)
                    if t is not None:
                        sub[f"{n}/{key}"] = t.detach().to("cpu", t.dtype if t.dtype == torch.float64 else torch.float32).contiguous()
            with atomic_output(os.path.join(path, SUBSPACES)) as tmp:
                save_file(sub, str(tmp), metadata={"agl": json.dumps({"format": _FORMAT + ".subspaces"})})
            manifest = {
                "format": _FORMAT, "version": _VERSION, "world_size": self.world_size, "names": list(self.layers),
                "layers": {n: {"shape": list(self.shapes[n]),
                               "rank_U": None if ls.U is None else int(ls.U.shape[1]),
                               "rank_V": None if ls.V is None else int(ls.V.shape[1])} for n, ls in self.layers.items()},
                "num_samples": int(self.num_samples), "num_tokens": int(self.num_tokens),
                "fisher_scale": float(self.fisher_scale), "fisher_dtype": str(fisher_dtype).replace("torch.", ""),
                "options": self.options,
                "subspaces": {"file": SUBSPACES, "sha256": {k: tensor_digest(k, t) for k, t in sub.items()}},
                "shards": shards,
            }
            atomic_write_json(target, manifest)
            keep = {s["file"] for s in shards}
            for f in os.listdir(path):  # shards of an earlier save at another world size
                if f.startswith("fisher-") and f.endswith(".safetensors") and f not in keep:
                    os.unlink(os.path.join(path, f))
        if self.world_size > 1:
            dist.barrier(group=g)  # the manifest exists when save returns, on every rank
        return target

    @classmethod
    def load(cls, path: str, *, rank: Optional[int] = None, world_size: Optional[int] = None,
             device: str | torch.device = "cpu") -> "ShardedAlignmentState":
        """This rank's rows of the state at ``path``: a directory written by :meth:`save` at any world size
        (resharded by row ranges), or a whole state (``AlignmentState.save``). ``rank``/``world_size`` default to the
        default process group (else 0 of 1: the whole state, usable wherever an ``AlignmentState`` is). Each rank
        reads only the files overlapping its rows and verifies each tensor it reads against the recorded sha256."""
        rank, world = _rank_world(rank, world_size)
        path = os.fspath(path)
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, MANIFEST)):
            return _load_sharded(cls, path, rank, world, device)
        whole = path if path.endswith(".safetensors") else os.path.join(path, STATE_FILENAME)
        if not os.path.isfile(whole):
            raise ValueError(f"agl: no alignment state at {path!r} (expected a directory with {MANIFEST} written by "
                             f"ShardedAlignmentState.save, or a file written by AlignmentState.save)")
        return _load_whole_file(cls, whole, rank, world, device)


# ---------------------------------------------------------------------------------------------- reading
def _safe_open(file: str):
    from safetensors import safe_open

    if not os.path.isfile(file):
        raise ValueError(f"agl: {file!r} is missing (listed in the sharded state's manifest)")
    try:
        return safe_open(file, framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"agl: {file!r} is not a readable safetensors file ({exc})") from exc


def _read_rows_verified(f, file: str, key: str, digest: Optional[str], r0: int, r1: int,
                        out: Optional[Tensor] = None) -> Tensor:
    """Rows [r0, r1) of tensor ``key`` in the open file ``f``, written into ``out`` (allocated when None) and
    returned; the whole tensor is streamed through sha256 in row blocks and compared with ``digest`` (None: not
    verified), so at most one block beyond the rows is held."""
    sl = f.get_slice(key)
    shape = tuple(sl.get_shape())
    rows = shape[0]
    probe = sl[0:0]
    if out is None:
        out = probe.new_empty((r1 - r0,) + shape[1:])
    if out.dtype != probe.dtype or tuple(out.shape) != (r1 - r0,) + shape[1:]:
        raise ValueError(f"agl: {file!r} is corrupt: {key} is {probe.dtype} {shape}, the manifest describes "
                         f"{out.dtype} with {tuple(out.shape[1:])} columns")
    row_bytes = max(1, probe.element_size() * math.prod(shape[1:]))
    step = max(1, _READ_ROWS_BYTES // row_bytes)

    def blocks() -> Iterator[bytes]:
        for a in range(0, rows, step):
            b = min(rows, a + step)
            t = sl[a:b]
            lo, hi = max(a, r0), min(b, r1)
            if lo < hi:
                out[lo - r0: hi - r0].copy_(t[lo - a: hi - a])
            if t.numel():
                yield t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()

    if digest is None:
        for _ in blocks():
            pass
    else:
        actual = stream_digest(key, probe.dtype, shape, blocks())
        if actual != digest:
            raise ValueError(f"agl: {file!r} is corrupt: {key} has sha256 {actual[:16]}… but the manifest records "
                             f"{digest[:16]}…")
    return out


def _load_sharded(cls, path: str, rank: int, world: int, device) -> ShardedAlignmentState:
    with open(os.path.join(path, MANIFEST)) as fh:
        meta = json.load(fh)
    if meta.get("format") != _FORMAT:
        raise ValueError(f"agl: {path!r}/{MANIFEST} is not a sharded alignment state (format {meta.get('format')!r})")
    if int(meta.get("version", -1)) > _VERSION:
        raise ValueError(f"agl: {path!r} has sharded format version {meta['version']}, newer than this agl reads "
                         f"({_VERSION}); upgrade agl")
    names = meta["names"]
    sub = meta["subspaces"]
    with _safe_open(os.path.join(path, sub["file"])) as f:
        subspaces = {}
        for key, digest in sub["sha256"].items():
            t = f.get_tensor(key)
            if tensor_digest(key, t) != digest:
                raise ValueError(f"agl: {path!r}/{sub['file']} is corrupt: {key} does not match its sha256")
            subspaces[key] = t
    want = {n: row_range(meta["layers"][n]["shape"][0], rank, world) for n in names}
    dtype = getattr(torch, str(meta.get("fisher_dtype", "float32")))
    fisher = {n: torch.empty(want[n][1] - want[n][0], meta["layers"][n]["shape"][1], dtype=dtype) for n in names}
    filled = {n: 0 for n in names}
    for shard in meta["shards"]:
        touched = [n for n in names if max(want[n][0], shard["rows"][n][0]) < min(want[n][1], shard["rows"][n][1])]
        if not touched:
            continue
        file = os.path.join(path, shard["file"])
        with _safe_open(file) as f:
            for n in touched:
                s0, s1 = shard["rows"][n]
                r0, r1 = want[n]
                key = f"{n}/fisher"
                lo, hi = max(r0, s0), min(r1, s1)
                _read_rows_verified(f, file, key, shard["sha256"].get(key), lo - s0, hi - s0, fisher[n][lo - r0: hi - r0])
                filled[n] += hi - lo
    layers, shapes = {}, {}
    for n in names:
        m, ncol = meta["layers"][n]["shape"]
        r0, r1 = want[n]
        if filled[n] != r1 - r0:  # shards' rows are disjoint: a shortfall is a gap in the files
            raise ValueError(f"agl: {path!r} is corrupt: its shards give {filled[n]} of rows [{r0}, {r1}) of {n}/fisher")
        F = fisher.pop(n)
        U, V = subspaces.get(f"{n}/U"), subspaces.get(f"{n}/V")
        layers[n] = LayerState(*(None if t is None else t.to(device) for t in (F, U, V)))
        shapes[n] = (int(m), int(ncol))
    return cls(layers, int(meta.get("num_samples", 0)), float(meta.get("fisher_scale", 1.0)),
               dict(meta.get("options", {})), int(meta.get("num_tokens", 0)), rank=rank, world_size=world, shapes=shapes)


def _load_whole_file(cls, file: str, rank: int, world: int, device) -> ShardedAlignmentState:
    if world == 1:  # the whole state: AlignmentState.load checks everything
        st = AlignmentState.load(file, device=device)
        return cls(st.layers, st.num_samples, st.fisher_scale, st.options, st.num_tokens, rank=0, world_size=1,
                   shapes={n: ls.shape for n, ls in st.layers.items()})
    with _safe_open(file) as f:
        raw = (f.metadata() or {}).get("agl")
        if raw is None:
            raise ValueError(f"agl: {file!r} has no AGL header; it was not written by AlignmentState.save")
        meta = json.loads(raw)
        digests = meta.get("sha256")
        if digests is None:
            raise ValueError(f"agl: {file!r} has no tensor checksum (saved by an older agl); load it in one process "
                             "with AlignmentState.load and save it again")
        layers, shapes = {}, {}
        for n in meta.get("names", list(meta["layers"])):
            m, ncol = meta["layers"][n]["shape"]
            r0, r1 = row_range(m, rank, world)
            F = _read_rows_verified(f, file, f"{n}/fisher", digests.get(f"{n}/fisher"), r0, r1)
            UV = []
            for key in ("U", "V"):
                k = f"{n}/{key}"
                t = f.get_tensor(k) if k in digests else None
                if t is not None and tensor_digest(k, t) != digests[k]:
                    raise ValueError(f"agl: {file!r} is corrupt: {k} does not match its sha256")
                UV.append(t)
            layers[n] = LayerState(*(None if t is None else t.to(device) for t in (F, *UV)))
            shapes[n] = (int(m), int(ncol))
    return cls(layers, int(meta.get("num_samples", 0)), float(meta.get("fisher_scale", 1.0)),
               dict(meta.get("options", {})), int(meta.get("num_tokens", 0)), rank=rank, world_size=world, shapes=shapes)
