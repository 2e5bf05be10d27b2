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
) -> None:
    """Raise a clear TypeError/ValueError for any malformed AGL input (see ``agl.functional.agl_terms``)."""
    _check_float("B", B)
    _check_float("A", A)
    m, r = B.shape
    if A.shape[0] != r:
        raise ValueError(f"agl: `A` must have shape (r, n) with r = B.shape[1] = {r}; got B {tuple(B.shape)}, A {tuple(A.shape)}")
    n = A.shape[1]
    if A.dtype != B.dtype:
        raise TypeError(f"agl: `A` and `B` must share a dtype, got A {A.dtype} and B {B.dtype}")
    if (B_align is None) != (A_align is None):
        raise ValueError("agl: `B_align` and `A_align` must be given together (or both None)")
    if align_mask is not None and B_align is not None:
        raise ValueError("agl: give either `align_mask` or (`B_align`, `A_align`), not both")
    if B_align is not None:
        _check_float("B_align", B_align)
        _check_float("A_align", A_align)
        if B_align.shape[0] != m or A_align.shape[1] != n or B_align.shape[1] != A_align.shape[0]:
            raise ValueError(
                f"agl: `B_align` must be (m, r') and `A_align` (r', n) with m={m}, n={n}; "
                f"got B_align {tuple(B_align.shape)}, A_align {tuple(A_align.shape)}"
            )
        for name, t in (("B_align", B_align), ("A_align", A_align)):
            if t.dtype != B.dtype:
                raise TypeError(f"agl: `{name}` must have the dtype of `B` ({B.dtype}), got {t.dtype}")
    for name, t in (("fisher", fisher), ("task_metric", task_metric), ("align_mask", align_mask)):
        if t is None:
            continue
        _check_float(name, t)
        if tuple(t.shape) != (m, n):
            raise ValueError(f"agl: `{name}` must have shape (m, n) = ({m}, {n}) like B @ A, got {tuple(t.shape)}")
    for name, t in (("A", A), ("B_align", B_align), ("A_align", A_align), ("fisher", fisher),
                    ("task_metric", task_metric), ("align_mask", align_mask)):
        if t is not None and t.device != B.device:
            raise ValueError(f"agl: `{name}` is on {t.device} but `B` is on {B.device}; all tensors must share a device")
    for name, v in (("scale", scale), ("beta", beta), ("tau", tau), ("sharpness", sharpness), ("eps", eps)):
        if isinstance(v, Tensor) or not isinstance(v, (int, float)) or isinstance(v, bool):
            raise TypeError(f"agl: `{name}` must be a Python float, got {type(v).__name__}")
        if not math.isfinite(v):
            raise ValueError(f"agl: `{name}` must be finite, got {v}")
    if sharpness < 0:
        raise ValueError(f"agl: `sharpness` must be >= 0, got {sharpness}")
    if eps < 0:
        raise ValueError(f"agl: `eps` must be >= 0, got {eps}")
