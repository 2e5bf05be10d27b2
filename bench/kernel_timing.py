"""Quick CUDA timing of the fused op alone vs the eager reference (no torch.compile, about 20 s): a fallback for
bench/device_check.sh when the full benchmark (bench/bench_ops.py) runs out of time, and a fast loop while tuning.

    python3 bench/kernel_timing.py [--shapes 4096x4096r16,4096x11008r16] [--dtypes float32,bfloat16] [--out FILE]

Times (CUDA events, median of --reps after warm-up): forward, backward (the forward untimed) and fwd+bwd, with
B_align/A_align of the same rank and fisher + task_metric, as in the benchmark. Prints the fraction of the HBM
bandwidth the kernels' compulsory traffic (F and H read once per pass) would need at a 4.8 TB/s peak.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _results import append_rows, provenance  # noqa: E402  (bench/_results.py, same directory)

from agl import reference  # noqa: E402
from agl.functional import agl_terms  # noqa: E402

W = (1.0, 0.5, 0.25, 0.1)


def inputs(m, n, r, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    std = (0.05 / r**0.5) ** 0.5

    def f(*s):
        return (torch.randn(*s, device="cuda", generator=g) * std).to(dtype).requires_grad_()

    B, A, Ba, Aa = f(m, r), f(r, n), f(m, r), f(r, n)
    F = torch.rand(m, n, device="cuda", generator=g).to(dtype)
    H = torch.rand(m, n, device="cuda", generator=g).to(dtype)
    return (B, A, Ba, Aa), dict(fisher=F, task_metric=H)


def loss_of(fn, leaves, kw):
    out = fn(*leaves, **kw)
    return sum(w * t.float() for w, t in zip(W, out))


def timeit(fn, reps):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="4096x4096r16,4096x11008r16")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None, help="add the rows to this results file (bench/_results.py format)")
    args = ap.parse_args()
    prov = provenance()  # at the start: the load the run began under
    rows = []
    print(f"{torch.cuda.get_device_name(0)}  torch {torch.__version__}")
    print(f"{'shape':>16} {'dtype':>9} {'provider':>8} {'fwd ms':>8} {'bwd ms':>8} {'f+b ms':>8} {'F/H GB/s f+b':>13}")
    for shape in args.shapes.split(","):
        m, rest = shape.split("x")
        n, r = rest.split("r")
        m, n, r = int(m), int(n), int(r)
        for dname in args.dtypes.split(","):
            dtype = getattr(torch, dname)
            leaves, kw = inputs(m, n, r, dtype)
            for prov, fn in (("agl", lambda *a, **k: agl_terms(*a, backend="kernel", **k)),
                             ("eager", reference.agl_terms)):
                try:
                    fwd = timeit(lambda: loss_of(fn, leaves, kw), args.reps)

                    def bwd_only():
                        loss = loss_of(fn, leaves, kw)
                        torch.cuda.synchronize()
                        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        s.record()
                        torch.autograd.grad(loss, leaves)
                        e.record()
                        torch.cuda.synchronize()
                        return s.elapsed_time(e)

                    for _ in range(3):
                        bwd_only()
                    bwd = statistics.median(bwd_only() for _ in range(args.reps))
                    fb = timeit(lambda: torch.autograd.grad(loss_of(fn, leaves, kw), leaves), args.reps)
                except torch.cuda.OutOfMemoryError:
                    print(f"{shape:>16} {dname:>9} {prov:>8}  OOM")
                    torch.cuda.empty_cache()
                    continue
                traffic = 2 * 2 * m * n * torch.tensor([], dtype=dtype).element_size()  # F and H, once per pass
                gbs = traffic / (fb * 1e-3) / 1e9
                print(f"{shape:>16} {dname:>9} {prov:>8} {fwd:8.3f} {bwd:8.3f} {fb:8.3f} {gbs:13.0f}")
                rows.append(dict(shape=shape, dtype=dname, provider=prov, fwd_ms=fwd, bwd_ms=bwd, fwd_bwd_ms=fb,
                                 device=torch.cuda.get_device_name(0), torch=torch.__version__))
            del leaves, kw
            torch.cuda.empty_cache()
    for shape in args.shapes.split(","):
        for dname in args.dtypes.split(","):
            k = [x for x in rows if x["shape"] == shape and x["dtype"] == dname]
            a = [x for x in k if x["provider"] == "agl"]
            e = [x for x in k if x["provider"] == "eager"]
            if a and e:
                print(f"speedup vs eager {shape} {dname}: fwd+bwd {e[0]['fwd_bwd_ms'] / a[0]['fwd_bwd_ms']:.1f}x")
    if args.out:
        append_rows(args.out, rows, prov, key=("device", "torch", "shape", "dtype", "provider"))


if __name__ == "__main__":
    main()
