"""One forward+backward of the fused op per (shape, dtype), for profilers (Nsight Compute, compute-sanitizer).

    ncu -k regex:terms_ --section SpeedOfLight python3 bench/ncu_probe.py --shapes 4096x4096r16 --dtypes float32
    compute-sanitizer --tool memcheck python3 bench/ncu_probe.py --shapes 67x131r5 --dtypes float32,bfloat16

Inputs as in bench/kernel_timing.py (B, A, B_align, A_align of rank r, fisher and task_metric). Prints the terms and
the gradient norms so a sanitizer run also shows the values it produced. Needs a CUDA GPU.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernel_timing import inputs, loss_of  # noqa: E402  (same directory)

from agl.functional import agl_terms  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4096x4096r16")
    ap.add_argument("--dtypes", default="float32")
    args = ap.parse_args()
    for shape in args.shapes.split(","):
        m, rest = shape.split("x")
        n, r = (int(v) for v in rest.split("r"))
        for dname in args.dtypes.split(","):
            leaves, kw = inputs(int(m), n, r, getattr(torch, dname))
            loss = loss_of(lambda *a, **k: agl_terms(*a, backend="kernel", **k), leaves, kw)
            grads = torch.autograd.grad(loss, leaves)
            torch.cuda.synchronize()
            norms = ", ".join(f"{g.float().norm().item():.4g}" for g in grads)
            print(f"{shape} {dname}: loss {loss.item():.6g}, grad norms {norms}")


if __name__ == "__main__":
    main()
