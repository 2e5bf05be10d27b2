"""One forward+backward of the fused op per (shape, dtype), for profilers (Nsight Compute, compute-sanitizer), or
with --profile a torch.profiler table of --iters calls: where the time of a call goes, host vs device.

    ncu -k regex:terms_ --section SpeedOfLight python3 bench/ncu_probe.py --shapes 4096x4096r16 --dtypes float32
    compute-sanitizer --tool memcheck python3 bench/ncu_probe.py --shapes 67x131r5 --dtypes float32,bfloat16
    python3 bench/ncu_probe.py --profile --iters 20

Inputs as in bench/kernel_timing.py (B, A, B_align, A_align of rank r, fisher and task_metric). Prints the terms and
the gradient norms so a sanitizer run also shows the values it produced, after one line with the run's provenance
(it writes no result file: its output is the log). Needs a CUDA GPU.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernel_timing import inputs, loss_of  # noqa: E402  (same directory)

from _results import provenance  # noqa: E402  (bench/_results.py, same directory)

from agl.functional import agl_terms  # noqa: E402


def profile(call, iters, label):
    """Prints the per-call host (CPU) and device (CUDA) time of `call` and the top ops, from torch.profiler."""
    import time

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    for _ in range(5):
        call()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        call()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / iters * 1e3
    with tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            call()
        torch.cuda.synchronize()
    ev = prof.key_averages()
    dev = sum(e.self_device_time_total for e in ev) / iters / 1e3
    print(f"[profile] {label}: wall {wall:.3f} ms/call (unprofiled), device busy {dev:.3f} ms/call, "
          f"kernels {sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA) / iters:.1f}"
          f"/call")
    print(ev.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4096x4096r16")
    ap.add_argument("--dtypes", default="float32")
    ap.add_argument("--profile", action="store_true", help="torch.profiler table instead of one plain call")
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    print("[provenance]", json.dumps(provenance()), flush=True)
    for shape in args.shapes.split(","):
        m, rest = shape.split("x")
        n, r = (int(v) for v in rest.split("r"))
        for dname in args.dtypes.split(","):
            leaves, kw = inputs(int(m), n, r, getattr(torch, dname))

            def call():
                loss = loss_of(lambda *a, **k: agl_terms(*a, backend="kernel", **k), leaves, kw)
                return loss, torch.autograd.grad(loss, leaves)

            if args.profile:
                profile(call, args.iters, f"{shape} {dname}")
            loss, grads = call()
            torch.cuda.synchronize()
            norms = ", ".join(f"{g.float().norm().item():.4g}" for g in grads)
            print(f"{shape} {dname}: loss {loss.item():.6g}, grad norms {norms}")


if __name__ == "__main__":
    main()
