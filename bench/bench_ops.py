"""Benchmark: the fused AGL op vs the pure-PyTorch reference (eager and torch.compile'd).

    python bench/bench_ops.py                      # all shapes, float32 + bfloat16, on CUDA when available
    python bench/bench_ops.py --device cpu --quick # a small CPU subset (a few minutes on 2 cores)
    python bench/bench_ops.py --shapes 4096x4096r16 --dtypes float32 --providers agl,eager
    python bench/bench_ops.py --device cuda --providers agl,eager --no-mem --reps 20   # quick: no compile, ~20 s
    ncu -k regex:terms_ --section SpeedOfLight python bench/bench_ops.py --probe --shapes 4096x4096r16 --dtypes float32
    compute-sanitizer --tool memcheck python bench/bench_ops.py --probe --shapes 67x131r5 --dtypes float32,bfloat16
    python bench/bench_ops.py --profile 20 --shapes 4096x4096r16 --dtypes float32

Modes: forward (terms with the autograd graph built), backward (grads of a weighted sum of the terms, the forward
untimed), fwd+bwd. Providers: agl (agl.functional.agl_terms, backend="kernel"), grouped (the same layer through
agl.functional.agl_terms_grouped, a 1-layer group), null (the grouped op's do-nothing twin
``agl_bench::terms_grouped_null`` of a bench/test build, through the same Python path and autograd: the floor the
harness and the host path impose), eager (agl.reference.agl_terms), compiled (torch.compile(agl.reference.agl_terms)).
Inputs (agl.testing.random_layer): B, A, B_align, A_align of rank r, fisher and task_metric in the factor dtype (the
usual AGL setting). Timings: median / p20 / p80 over --reps repetitions after warm-up. Peak memory: on CUDA
torch.cuda.max_memory_allocated() above the inputs; on CPU the peak-RSS increase of a fresh subprocess per
(shape, dtype, provider) that builds the inputs and then runs forward and fwd+bwd once (tracemalloc cannot see
torch's allocations). Rows go to bench/results/<device-slug>.json through bench/_results.py (each with its
provenance; rows of other commits are kept beside them, see there); a table is printed. On CUDA, bytes and FLOPs
per call and the achieved fraction of a measured copy bandwidth and matmul rate are printed too.

--probe: one fwd+bwd of the fused op per (shape, dtype), for Nsight Compute and compute-sanitizer (prints the run's
provenance, the loss and the grad norms; writes no result file); --profile N: a torch.profiler table of N calls first
(host vs device time per call, the top ops).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _results import append_rows, provenance  # noqa: E402  (bench/_results.py, same directory)

from agl import reference  # noqa: E402
from agl.functional import agl_terms, agl_terms_grouped  # noqa: E402
from agl.testing import random_layer  # noqa: E402

ALL_SHAPES = ["576x576r8", "4096x4096r16", "4096x11008r16", "11008x4096r64"]
QUICK_SHAPES = ["576x576r8", "4096x4096r16"]
MODES = ["forward", "backward", "fwd+bwd"]
PROVIDERS = ["agl", "grouped", "null", "eager", "compiled"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
WEIGHTS = (1.0, 0.5, 0.25, 0.1)
ROW_KEY = ("device", "threads", "torch", "shape", "dtype", "mode", "provider")  # a measurement's identity


def parse_shape(s: str):
    m = re.fullmatch(r"(\d+)x(\d+)r(\d+)", s)
    if not m:
        raise argparse.ArgumentTypeError(f"shape must look like 4096x4096r16, got {s!r}")
    return tuple(int(v) for v in m.groups())


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "cpu"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def make_inputs(m, n, r, dtype, device, seed=0):
    """(B, A, B_align, A_align, fisher, task_metric): one layer of agl.testing, align pair of rank r."""
    x = random_layer(torch.Generator().manual_seed(seed), m, n, r, r, dtype=dtype, device=device)
    return tuple(x[k] for k in ("B", "A", "Ba", "Aa", "F", "H"))


_COMPILED = None


def provider_fn(provider):
    global _COMPILED
    if provider == "agl":
        return lambda B, A, Ba, Aa, F, H: agl_terms(B, A, Ba, Aa, fisher=F, task_metric=H, backend="kernel")
    if provider == "grouped":
        return lambda B, A, Ba, Aa, F, H: agl_terms_grouped([B], [A], [Ba], [Aa], fishers=[F], task_metrics=[H],
                                                            scales=[1.0], backend="kernel")[0].unbind()
    if provider == "null":
        from agl import ops

        return lambda B, A, Ba, Aa, F, H: ops.agl_terms_grouped_kernel(
            [B], [A], [Ba], [Aa], [], [], [F], [H], [1.0], 4.0, 0.01, 100.0, 1e-12, null=True)[0].unbind()
    if provider == "eager":
        return lambda B, A, Ba, Aa, F, H: reference.agl_terms(B, A, Ba, Aa, fisher=F, task_metric=H)
    if provider == "compiled":
        if _COMPILED is None:
            _COMPILED = torch.compile(reference.agl_terms)
        return lambda B, A, Ba, Aa, F, H: _COMPILED(B, A, Ba, Aa, fisher=F, task_metric=H)
    raise ValueError(provider)


def loss_of(terms):
    return sum(w * t.float() for w, t in zip(WEIGHTS, terms))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_call(fn, inputs, mode, device):
    """Runs one call of `mode`; returns the timed seconds."""
    B, A, Ba, Aa, F, H = inputs
    fs = [t.detach().requires_grad_() for t in (B, A, Ba, Aa)]
    if mode == "backward":
        loss = loss_of(fn(*fs, F, H))
        sync(device)
        t0 = time.perf_counter()
        torch.autograd.grad(loss, fs)
        sync(device)
        return time.perf_counter() - t0
    sync(device)
    t0 = time.perf_counter()
    terms = fn(*fs, F, H)
    if mode == "fwd+bwd":
        torch.autograd.grad(loss_of(terms), fs)
    sync(device)
    return time.perf_counter() - t0


def time_provider(provider, inputs, mode, device, reps, warmup):
    fn = provider_fn(provider)
    for _ in range(warmup):
        one_call(fn, inputs, mode, device)
    ts = sorted(one_call(fn, inputs, mode, device) * 1e3 for _ in range(reps))
    q = statistics.quantiles(ts, n=5, method="inclusive") if len(ts) > 1 else [ts[0]] * 4
    return statistics.median(ts), q[0], q[3]


def cuda_peak(provider, inputs, mode, device):
    fn = provider_fn(provider)
    one_call(fn, inputs, mode, device)  # warm (compiles, caches)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    one_call(fn, inputs, mode, device)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes():
    """Peak RSS since the last _reset_peak() (VmHWM), else since the process started."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak():
    try:  # Linux >= 4.0: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def mem_child(provider, shape, dtype_name, threads):
    """In a fresh process: peak-RSS increase of one forward, then of one fwd+bwd (printed as JSON)."""
    torch.set_num_threads(threads)
    m, n, r = parse_shape(shape)
    device = torch.device("cpu")
    inputs = make_inputs(m, n, r, DTYPES[dtype_name], device)
    fn = provider_fn(provider)
    # Warm up on tiny inputs of the same rank first (thread pool, allocator, and for `compiled` the compilation),
    # so one-off start-up memory stays out of the measurement.
    one_call(fn, make_inputs(8, 8, r, DTYPES[dtype_name], device), "fwd+bwd", device)
    _reset_peak()
    base = max(_rss_bytes(), _maxrss_bytes())
    one_call(fn, inputs, "forward", device)
    fwd = _maxrss_bytes() - base
    _reset_peak()
    base2 = _rss_bytes()
    one_call(fn, inputs, "fwd+bwd", device)
    both = _maxrss_bytes() - base2
    print(json.dumps({"forward": max(fwd, 0), "fwd+bwd": max(both, 0), "backward": max(both, 0)}))


def cpu_peaks(provider, shape, dtype_name, threads):
    cmd = [sys.executable, __file__, "--_mem-child", provider, shape, dtype_name, str(threads)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError) as exc:
        print(f"  [memory] {provider} {shape} {dtype_name}: measurement failed ({exc})", file=sys.stderr)
        return {}


def roofline(inputs, mode, ms, dtype, device):
    """Bytes and FLOPs per call of the fused op, and the fraction of measured copy bandwidth / matmul rate."""
    B, A, Ba, Aa, F, H = inputs
    m, r = B.shape
    n, ra = A.shape[1], Ba.shape[1]
    fac = sum(t.numel() * t.element_size() for t in (B, A, Ba, Aa))
    met = F.numel() * F.element_size() + H.numel() * H.element_size()
    elem_f, elem_b = 2 * (r + ra) + 30, 2 * (r + ra) + 60 + 4 * (r + ra)
    byts = {"forward": fac + met, "backward": 2 * fac + met, "fwd+bwd": 3 * fac + 2 * met}[mode]
    flops = m * n * {"forward": elem_f, "backward": elem_b, "fwd+bwd": elem_f + elem_b}[mode]
    return byts, flops


def measure_peaks(device, dtype):
    x = torch.empty(2**28, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    sync(device)
    bw = 2 * x.numel() * 10 / (time.perf_counter() - t0)
    k = 8192
    a = torch.randn(k, k, device=device, dtype=dtype)
    b = torch.randn(k, k, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    fl = 2 * k**3 * 10 / (time.perf_counter() - t0)
    return bw, fl


def probe(shapes, dtypes, device, profile_iters=0):
    """One forward+backward of the fused op per (shape, dtype), printing the loss and the grad norms (a sanitizer log
    then shows the values the kernels produced); with profile_iters > 0 first a torch.profiler table of that many
    calls. Writes no result file: its output is the log."""
    print("[provenance]", json.dumps(provenance()), flush=True)
    fn = provider_fn("agl")
    for shape in shapes:
        m, n, r = parse_shape(shape)
        for dname in dtypes:
            B, A, Ba, Aa, F, H = make_inputs(m, n, r, DTYPES[dname], device)
            fs = [t.requires_grad_() for t in (B, A, Ba, Aa)]

            def call():
                loss = loss_of(fn(*fs, F, H))
                return loss, torch.autograd.grad(loss, fs)

            if profile_iters:
                profile(call, profile_iters, f"{shape} {dname}", device)
            loss, grads = call()
            sync(device)
            norms = ", ".join(f"{g.float().norm().item():.4g}" for g in grads)
            print(f"{shape} {dname}: loss {loss.item():.6g}, grad norms {norms}")


def profile(call, iters, label, device):
    """Prints the per-call wall time of `call` (unprofiled), the device busy time and kernels per call, and the top
    ops by device time, from torch.profiler."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    for _ in range(5):
        call()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        call()
    sync(device)
    wall = (time.perf_counter() - t0) / iters * 1e3
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with tprofile(activities=acts) as prof:
        for _ in range(iters):
            call()
        sync(device)
    ev = prof.key_averages()
    dev = sum(e.self_device_time_total for e in ev) / iters / 1e3
    kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA) / iters
    print(f"[profile] {label}: wall {wall:.3f} ms/call (unprofiled), device busy {dev:.3f} ms/call, "
          f"kernels {kernels:.1f}/call")
    print(ev.table(sort_by="self_device_time_total" if device.type == "cuda" else "self_cpu_time_total",
                   row_limit=12, max_name_column_width=60))


def _has_null_ops() -> bool:
    from agl import ops

    return ops.has_null_ops()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--shapes", default=None, help=f"comma list like 4096x4096r16 (default: {','.join(ALL_SHAPES)})")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--quick", action="store_true", help=f"shapes {','.join(QUICK_SHAPES)}, float32, fewer reps")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--no-mem", action="store_true", help="skip the peak-memory measurement")
    ap.add_argument("--out", default=None, help="results file (default bench/results/<device-slug>.json)")
    ap.add_argument("--probe", action="store_true", help="one fwd+bwd of the fused op per shape and dtype, for ncu "
                    "or compute-sanitizer (default shapes 4096x4096r16, float32); no result file")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="with --probe (implied): a torch.profiler "
                    "table of N calls first")
    ap.add_argument("--_mem-child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._mem_child:
        p, s, d, t = args._mem_child
        mem_child(p, s, d, int(t))
        return
    if args.probe or args.profile:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtypes = "float32" if args.dtypes == "float32,bfloat16" else args.dtypes
        probe((args.shapes or "4096x4096r16").split(","), dtypes.split(","), device, args.profile)
        return

    run_prov = provenance()  # at the start: the load the run began under
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.quick:
        shapes = args.shapes.split(",") if args.shapes else QUICK_SHAPES
        dtypes = ["float32"] if args.dtypes == "float32,bfloat16" else args.dtypes.split(",")
    else:
        shapes = args.shapes.split(",") if args.shapes else ALL_SHAPES
        dtypes = args.dtypes.split(",")
    modes = args.modes.split(",")
    providers = args.providers.split(",")
    if "null" in providers and not _has_null_ops():
        print("[bench] no `null` rows: the extension is not a bench/test build (AGL_BENCH_OPS=1, `make build`)",
              file=sys.stderr)
        providers.remove("null")
    reps = args.reps or (5 if args.quick else 10)
    warmup = 2 if device.type == "cuda" else 1
    name = device_name(device)
    threads = torch.get_num_threads()
    print(f"device: {name} ({device.type}, {threads} threads), torch {torch.__version__}", file=sys.stderr)
    peaks = {}
    rows = []
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"{slug(name)}.json"
    for shape in shapes:
        m, n, r = parse_shape(shape)
        for dname in dtypes:
            dtype = DTYPES[dname]
            inputs = make_inputs(m, n, r, dtype, device)
            mem, measured = {}, []
            for prov in providers:
                if args.no_mem:
                    mem[prov] = {}
                elif device.type == "cpu":
                    mem[prov] = cpu_peaks(prov, shape, dname, threads)
                else:
                    try:
                        mem[prov] = {md: cuda_peak(prov, inputs, md, device) for md in modes}
                    except Exception as exc:  # a provider that fails (e.g. a path not yet run on this device)
                        print(f"  [memory] {prov} {shape} {dname}: failed ({exc})", file=sys.stderr)
                        mem[prov] = {}
            for mode in modes:
                group = {}
                for prov in providers:
                    try:
                        med, p20, p80 = time_provider(prov, inputs, mode, device, reps, warmup)
                    except Exception as exc:  # one failing provider must not cost the others' rows
                        print(f"  {shape:>14} {dname:>8} {mode:>8} {prov:>8}: failed ({exc})", file=sys.stderr)
                        continue
                    group[prov] = dict(device=name, device_type=device.type, threads=threads,
                                       torch=torch.__version__, shape=shape, dtype=dname, mode=mode, provider=prov,
                                       median_ms=round(med, 4), p20_ms=round(p20, 4), p80_ms=round(p80, 4),
                                       peak_mem_bytes=mem[prov].get(mode))
                    print(f"  {shape:>14} {dname:>8} {mode:>8} {prov:>8}: {med:9.2f} ms", file=sys.stderr)
                for row in group.values():
                    e, c = group.get("eager"), group.get("compiled")
                    row["speedup_vs_eager"] = round(e["median_ms"] / row["median_ms"], 3) if e else None
                    row["speedup_vs_compiled"] = round(c["median_ms"] / row["median_ms"], 3) if c else None
                    if row["peak_mem_bytes"] is not None and e and e["peak_mem_bytes"]:
                        row["mem_vs_eager"] = round(row["peak_mem_bytes"] / e["peak_mem_bytes"], 4)
                if device.type == "cuda" and "agl" in group:
                    if dname not in peaks:
                        peaks[dname] = measure_peaks(device, dtype)
                    bw, fl = peaks[dname]
                    byts, flops = roofline(inputs, mode, group["agl"]["median_ms"], dtype, device)
                    sec = group["agl"]["median_ms"] / 1e3
                    group["agl"].update(bytes_per_call=byts, flops_per_call=flops,
                                        frac_copy_bw=round(byts / sec / bw, 4), frac_matmul=round(flops / sec / fl, 4))
                    print(f"    agl roofline: {byts / 1e6:.1f} MB, {flops / 1e9:.2f} GFLOP per call; "
                          f"{byts / sec / 1e9:.0f} GB/s = {byts / sec / bw:.1%} of copy bandwidth "
                          f"({bw / 1e9:.0f} GB/s), {flops / sec / 1e12:.2f} TFLOP/s = {flops / sec / fl:.1%} of "
                          f"{dname} matmul ({fl / 1e12:.0f} TFLOP/s)", file=sys.stderr)
                measured += list(group.values())
            del inputs
            # after every (shape, dtype): a run cut short keeps what it measured (only this group's rows: a
            # dirty-tree run replaces nothing, so re-sending earlier rows would duplicate them)
            append_rows(out, measured, run_prov, key=ROW_KEY)
            rows += measured
    hdr = f"{'shape':>14} {'dtype':>8} {'mode':>8} {'provider':>9} {'median ms':>10} {'p20':>9} {'p80':>9} " \
          f"{'peak MB':>9} {'x eager':>8} {'x compiled':>10}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        pm = f"{r['peak_mem_bytes'] / 2**20:9.1f}" if r["peak_mem_bytes"] is not None else f"{'-':>9}"
        se = f"{r['speedup_vs_eager']:8.2f}" if r["speedup_vs_eager"] else f"{'-':>8}"
        sc = f"{r['speedup_vs_compiled']:10.2f}" if r["speedup_vs_compiled"] else f"{'-':>10}"
        print(f"{r['shape']:>14} {r['dtype']:>8} {r['mode']:>8} {r['provider']:>9} {r['median_ms']:10.2f} "
              f"{r['p20_ms']:9.2f} {r['p80_ms']:9.2f} {pm} {se} {sc}")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
