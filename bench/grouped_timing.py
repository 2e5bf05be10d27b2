"""CUDA timing of the grouped AGL op on model-shaped layer sets: forward + backward of ``agl_terms_grouped`` with
the B_align = U(UᵀB), A_align = (AV)Vᵀ projections formed inside the op, as ``AGLLoss`` calls it.

Sets: ``135m`` = 120 layers of 576 x 576, r 8 (SmolLM2-135M, q/k/v/o of 30 blocks); ``7b`` = 128 layers of
4096 x 4096, r 16; ``one4096`` = one such layer (the kernel goal: >= 10x eager, >= 3x compiled). Factors float32,
fisher float32 or bfloat16, U/V rank 16.
Providers:
  per-layer   one ``agl_terms`` call per layer plus the two projection matmuls (what AGLLoss did before)
  default     the grouped op on the verified per-layer kernels (switch off)
  grouped-tc  the opt-in single-launch tensor-core kernels (``agl.ops.set_cuda_grouped(True)``)
  null        ``agl_bench::terms_grouped_null`` + ``_null_bwd`` (bench/test build, AGL_BENCH_OPS=1): same arguments,
              outputs only (the floor the harness imposes)
  reference   the pure-PyTorch reference per layer, eager (only for sets of at most 8 layers)
Wall time per forward+backward: CUDA events around ``--reps`` iterations, median of 5 groups. For every provider but
null also the GPU time per iteration from CUDA-graph replay (no host work), when capture succeeds.

    python bench/grouped_timing.py --sets 135m,7b --fisher-dtypes float32,bfloat16 --out grouped_timing.json
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

SETS = {"135m": (120, 576, 576, 8), "7b": (128, 4096, 4096, 16), "one4096": (1, 4096, 4096, 16)}
PROVIDERS = ("per-layer", "default", "grouped-tc", "null", "reference")


def make_set(name: str, fisher_dtype: torch.dtype, seed: int = 0):
    L, m, n, r = SETS[name]
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"

    def rnd(*shape, std=1.0, dtype=torch.float32):
        return (torch.randn(*shape, generator=g, device=dev) * std).to(dtype)

    Bs = [rnd(m, r, std=0.02).requires_grad_() for _ in range(L)]
    As = [rnd(r, n, std=0.02).requires_grad_() for _ in range(L)]
    Fs = [(torch.rand(m, n, generator=g, device=dev) * 2).to(fisher_dtype) for _ in range(L)]
    Us = [torch.linalg.qr(rnd(m, 16))[0] for _ in range(L)]
    Vs = [torch.linalg.qr(rnd(n, 16))[0] for _ in range(L)]
    return dict(Bs=Bs, As=As, Fs=Fs, Us=Us, Vs=Vs, scales=[2.0] * L)


def step_fn(provider: str, x: dict):
    """One forward + backward (gradients w.r.t. every B and A) of the provider."""
    from agl.functional import agl_terms, agl_terms_grouped

    leaves = x["Bs"] + x["As"]
    L = len(x["Bs"])
    if provider == "null":
        from agl import ops

        if not ops.has_null_ops():
            raise ValueError("null: needs a bench/test build of the extension (AGL_BENCH_OPS=1, `make build`)")
        args = (x["Bs"], x["As"], [None] * L, [None] * L, x["Us"], x["Vs"], x["Fs"], [None] * L, x["scales"], 4.0,
                0.01, 100.0, 1e-12)
        ones = torch.ones(L, 4, device="cuda")

        def run():
            _, sums = torch.ops.agl_bench.terms_grouped_null(*args)
            return torch.ops.agl_bench.terms_grouped_null_bwd(ones, sums, *args)
        return run
    if provider in ("per-layer", "reference"):
        if provider == "reference" and L > 8:
            raise ValueError("reference: only for sets of at most 8 layers (each layer holds ~12 m x n temporaries)")
        backend = "kernel" if provider == "per-layer" else "torch"

        def run():
            total = 0
            for l in range(L):
                B, A, U, V = x["Bs"][l], x["As"][l], x["Us"][l], x["Vs"][l]
                out = agl_terms(B, A, U @ (U.t() @ B), (A @ V) @ V.t(), fisher=x["Fs"][l], scale=x["scales"][l],
                                backend=backend)
                total = total + sum(out)
            return torch.autograd.grad(total, leaves)
        return run

    def run():
        out = agl_terms_grouped(x["Bs"], x["As"], Us=x["Us"], Vs=x["Vs"], fishers=x["Fs"], scales=x["scales"],
                                backend="kernel")
        return torch.autograd.grad(out.sum(), leaves)
    return run


def time_wall(run, reps: int) -> float:
    """Median over 5 groups of the mean time per call (ms), CUDA events."""
    for _ in range(2):
        run()
    torch.cuda.synchronize()
    groups = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            run()
        b.record()
        b.synchronize()
        groups.append(a.elapsed_time(b) / reps)
    return statistics.median(groups)


def time_graph(run, reps: int):
    """GPU time per call (ms) from CUDA-graph replay, or an error string when capture fails."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        return time_wall(graph.replay, reps)
    except Exception as e:  # report, do not hide: the row says why there is no number
        return f"capture failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default="135m,7b")
    ap.add_argument("--fisher-dtypes", default="float32,bfloat16")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    from tqdm import tqdm

    from agl import ops
    from agl._io import atomic_write_json
    from agl._provenance import provenance

    if not torch.cuda.is_available():
        raise SystemExit("grouped_timing: needs a CUDA GPU")
    rows = []
    configs = [(s, fd, p) for s in a.sets.split(",") for fd in a.fisher_dtypes.split(",") for p in a.providers.split(",")
               if not (p == "reference" and SETS[s][0] > 8)]
    data = {}
    for s, fd, p in tqdm(configs, desc="grouped timing"):
        key = (s, fd)
        if key not in data:
            data.clear()
            torch.cuda.empty_cache()
            data[key] = make_set(s, getattr(torch, fd))
        x = data[key]
        row = {"set": s, "layers": SETS[s][0], "shape": "%dx%dr%d" % SETS[s][1:], "fisher_dtype": fd, "provider": p}
        try:
            in_use = ops.set_cuda_grouped(p == "grouped-tc")
            if p == "grouped-tc" and not in_use:
                raise RuntimeError("the opt-in grouped CUDA kernels are not in this build")
            run = step_fn(p, x)
            row["wall_ms"] = time_wall(run, a.reps)
            if p != "null":
                row["graph_gpu_ms"] = time_graph(run, a.reps)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        finally:
            ops.set_cuda_grouped(os.environ.get("AGL_CUDA_GROUPED") == "1")
        rows.append(row)
        print(row, flush=True)
        atomic_write_json(a.out, {"provenance": provenance(), "device": torch.cuda.get_device_name(0), "rows": rows})


if __name__ == "__main__":
    main()
