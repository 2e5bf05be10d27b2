"""Input validation shared by the reference and the fused op: every error names the argument and what was expected."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

_FACTOR_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _check_float(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"agl: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FACTOR_DTYPES:
        raise TypeError(
            f"agl: `{name}` must be float32, float64, bfloat16 or float16, got {t.dtype} with shape {tuple(t.shape)}"
        )
    if t.dim() != 2:
        raise ValueError(f"agl: `{name}` must be a 2-D matrix, got shape {tuple(t.shape)}")


def check_inputs(
    B: Tensor,
    A: Tensor,
    B_align: Optional[Tensor],
    A_align: Optional[Tensor],
    fisher: Optional[Tensor],
    task_metric: Optional[Tensor],
    align_mask: Optional[Tensor],
    scale: float,
    beta: float,
    tau: float,
    sharpness: float,
    eps: float,
    layer: Optional[int] = None,
) -> None:
    """Raise a clear TypeError/ValueError for any malformed AGL input (see ``agl.functional.agl_terms``).
    ``layer``: the index of this layer in a grouped call; the messages then name ``Bs[layer]``, ``As[layer]``, ...."""
    nm = _namer(layer)
    _check_float(nm("B"), B)
    _check_float(nm("A"), A)
    m, r = B.shape
    if A.shape[0] != r:
        raise ValueError(f"agl: `{nm('A')}` must have shape (r, n) with r = {nm('B')}.shape[1] = {r}; got "
                         f"{nm('B')} {tuple(B.shape)}, {nm('A')} {tuple(A.shape)}")
    n = A.shape[1]
    if A.dtype != B.dtype:
        raise TypeError(f"agl: `{nm('A')}` and `{nm('B')}` must share a dtype, got {nm('A')} {A.dtype} and "
                        f"{nm('B')} {B.dtype}")
    if (B_align is None) != (A_align is None):
        raise ValueError(f"agl: `{nm('B_align')}` and `{nm('A_align')}` must be given together (or both None)")
    if align_mask is not None and B_align is not None:
        raise ValueError(f"agl: give either `{nm('align_mask')}` or (`{nm('B_align')}`, `{nm('A_align')}`), not both")
    if B_align is not None:
        _check_float(nm("B_align"), B_align)
        _check_float(nm("A_align"), A_align)
        if B_align.shape[0] != m or A_align.shape[1] != n or B_align.shape[1] != A_align.shape[0]:
            raise ValueError(
                f"agl: `{nm('B_align')}` must be (m, r') and `{nm('A_align')}` (r', n) with m={m}, n={n}; "
                f"got {nm('B_align')} {tuple(B_align.shape)}, {nm('A_align')} {tuple(A_align.shape)}"
            )
        if B_align.dtype != B.dtype or A_align.dtype != B.dtype:
            raise TypeError(f"agl: `{nm('B_align')}` and `{nm('A_align')}` must have the dtype of `{nm('B')}` "
                            f"({B.dtype}), got {B_align.dtype} and {A_align.dtype}")
    for name, t in (("fisher", fisher), ("task_metric", task_metric), ("align_mask", align_mask)):
        if t is None:
            continue
        _check_float(nm(name), t)
        if tuple(t.shape) != (m, n):
            raise ValueError(f"agl: `{nm(name)}` must have shape (m, n) = ({m}, {n}) like {nm('B')} @ {nm('A')}, "
                             f"got {tuple(t.shape)}")
    for name, t in (("A", A), ("B_align", B_align), ("A_align", A_align), ("fisher", fisher),
                    ("task_metric", task_metric), ("align_mask", align_mask)):
        if t is not None and t.device != B.device:
            raise ValueError(f"agl: `{nm(name)}` is on {t.device} but `{nm('B')}` is on {B.device}; all tensors "
                             "must share a device")
    _check_scalars((nm("scale"), scale))
    _check_scalars(("beta", beta), ("tau", tau), ("sharpness", sharpness), ("eps", eps))
    if sharpness < 0:
        raise ValueError(f"agl: `sharpness` must be >= 0, got {sharpness}")
    if eps < 0:
        raise ValueError(f"agl: `eps` must be >= 0, got {eps}")


def _namer(layer: Optional[int]):
    """name -> the name in messages: ``B`` alone, ``Bs[3]`` for layer 3 of a grouped call."""
    if layer is None:
        return lambda name: name
    return lambda name: f"{name}s[{layer}]"


def _check_scalars(*named) -> None:
    for name, v in named:
        if isinstance(v, Tensor) or not isinstance(v, (int, float)) or isinstance(v, bool):
            raise TypeError(f"agl: `{name}` must be a Python float, got {type(v).__name__}")
        if not math.isfinite(v):
            raise ValueError(f"agl: `{name}` must be finite, got {v}")


_LISTS = ("B_aligns", "A_aligns", "Us", "Vs", "fishers", "task_metrics")


def grouped_lists(Bs, As, B_aligns, A_aligns, Us, Vs, fishers, task_metrics, scales):
    """The structure of a grouped call, checked and normalised (no tensor is inspected beyond its type): lists of the
    per-layer inputs (``[]`` for an absent optional list) and the scales as floats. Raises naming the list and index.
    """
    L = _seq_len("Bs", Bs)
    if L == 0:
        raise ValueError("agl: `Bs` must hold at least one layer, got an empty list")
    out = {"Bs": list(Bs), "As": list(As) if _seq_len("As", As) == L else _wrong_len("As", As, L)}
    for name, v in zip(_LISTS, (B_aligns, A_aligns, Us, Vs, fishers, task_metrics)):
        if v is None:
            out[name] = []
        elif _seq_len(name, v) in (0, L):
            out[name] = list(v)
        else:
            _wrong_len(name, v, L, optional=True)
    for name in ("Bs", "As") + _LISTS:
        for l, t in enumerate(out[name]):
            if not isinstance(t, Tensor) and not (t is None and name in _LISTS):
                raise TypeError(f"agl: `{name}[{l}]` must be a torch.Tensor{' or None' if name in _LISTS else ''}, "
                                f"got {type(t).__name__}")
    if (out["Us"] or out["Vs"]) and any(t is not None for t in out["B_aligns"] + out["A_aligns"]):
        raise ValueError("agl: give either `B_aligns`/`A_aligns` or `Us`/`Vs`, not both")
    if isinstance(scales, (int, float)) and not isinstance(scales, bool):
        scales = [scales] * L
    if _seq_len("scales", scales) != L:
        _wrong_len("scales", scales, L)
    out["scales"] = list(scales)
    for l, v in enumerate(out["scales"]):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out["scales"][l] = float(v)
    return out


def _seq_len(name, v) -> int:
    if isinstance(v, (Tensor, str)) or not hasattr(v, "__len__") or not hasattr(v, "__iter__"):
        raise TypeError(f"agl: `{name}` must be a list (one entry per layer), got {type(v).__name__}")
    return len(v)


def _wrong_len(name, v, L, optional=False):
    raise ValueError(f"agl: `{name}` must have one entry per layer ({L} = len(Bs)){' or be empty' if optional else ''}"
                     f", got {len(v)}")


def check_grouped(Bs, As, B_aligns, A_aligns, Us, Vs, fishers, task_metrics, scales, beta, tau, sharpness, eps):
    """``check_inputs`` for every layer of a grouped call (lists as from :func:`grouped_lists`), plus the
    projections: ``Us[l]`` (m, k) and ``Vs[l]`` (n, k) of the factors' dtype and device, all layers on one device."""
    opt = lambda lst, l: lst[l] if lst else None  # noqa: E731
    for l in range(len(Bs)):
        B, A = Bs[l], As[l]
        check_inputs(B, A, opt(B_aligns, l), opt(A_aligns, l), opt(fishers, l), opt(task_metrics, l), None,
                     scales[l], beta, tau, sharpness, eps, layer=l)
        if B.device != Bs[0].device:
            raise ValueError(f"agl: `Bs[{l}]` is on {B.device} but `Bs[0]` is on {Bs[0].device}; all layers must "
                             "share a device")
        for name, t, rows, side, X in (("Us", opt(Us, l), B.shape[0], "m", "Bs"), ("Vs", opt(Vs, l), A.shape[1], "n",
                                                                                    "As")):
            if t is None:
                continue
            _check_float(f"{name}[{l}]", t)
            if t.shape[0] != rows:
                raise ValueError(f"agl: `{name}[{l}]` must have shape ({side}, k) with {side} = {rows} ({X}[{l}] has "
                                 f"shape {list((B if X == 'Bs' else A).shape)}), got {tuple(t.shape)}")
            if t.dtype != B.dtype:
                raise TypeError(f"agl: `{name}[{l}]` must have the dtype of `Bs[{l}]` ({B.dtype}), got {t.dtype}")
            if t.device != B.device:
                raise ValueError(f"agl: `{name}[{l}]` is on {t.device} but `Bs[{l}]` is on {B.device}; all tensors "
                                 "must share a device")
