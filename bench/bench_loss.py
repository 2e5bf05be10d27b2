"""AGLLoss overhead on one training step of a SmolLM2-135M-shaped Llama built from its config (hidden 576,
intermediate 1536, 30 layers, 9 heads, 3 kv heads, vocab 49152; random weights, nothing downloaded), LoRA r=8 on
q/k/v/o (120 LoRA layers): plain LoRA vs + AGLLoss with
  - ``kernel``: the default, one grouped op call per step (agl_terms_grouped; U/V projections inside the op),
  - ``kernel per-layer``: the previous path, one agl_terms call and two projection matmuls per layer,
  - ``null op``: AGLLoss's host path with the do-nothing op of the same signature (the floor of the harness),
  - ``torch``: the pure-PyTorch reference, layer by layer,
  - ``kernel cross``: ``AGLConfig(curvature="cross")``: the grouped op plus the cross-layer term (agl.curvature),
  - ``cross only``: the cross-layer term alone (what the default regulariser costs when λ_T = λ_NC = 0 skip the op).
(--skip torch,per-layer,null leaves configurations out; the reference and the per-layer path are slow on a busy box.)
Target: <= 10 % step overhead with the kernel on CPU.

    python bench/bench_loss.py [--batch 2 --seq 128 --steps 5 --layers 30]

A step is forward, loss, backward and an AdamW step. Also times the regulariser alone (forward + backward).
Configurations are interleaved step by step so machine-load drift hits all alike. Prints a table and adds a row to
bench/results/bench_loss.json (bench/_results.py: one row per configuration and commit, with provenance).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
from _results import append_rows, provenance  # noqa: E402  (bench/_results.py, same directory)

ROW_KEY = ("bench", "threads", "batch", "seq", "layers", "rank", "cross_samples")


def build(layers: int):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True,
                      rope_theta=100000.0)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    for n, p in model.named_parameters():  # a "trained" adapter, so every term is live
        if "lora_B" in n:
            p.data.normal_(0, 1e-3)
    return model


def synthetic_state(model, seed: int = 0, rank: int = 16, cross_samples: int = 48):
    """A state with the real shapes (Fisher mean 1, rank-``rank`` U and V, and the cross curvature's C of
    ``cross_samples`` samples): the overhead does not depend on its values."""
    from agl.fisher import AlignmentState, LayerState
    from agl.peft_binding import find_lora_layers

    g = torch.Generator().manual_seed(seed)
    layers = {}
    for b in find_lora_layers(model):
        m, n = b.shape
        F = torch.rand(m, n, generator=g) * 2
        U = torch.linalg.qr(torch.randn(m, rank, generator=g))[0]
        V = torch.linalg.qr(torch.randn(n, rank, generator=g))[0]
        C = torch.randn(cross_samples, rank, rank, generator=g)
        layers[b.name] = LayerState(F, U, V, C=C)
    return AlignmentState(layers, 1, num_tokens=40 * cross_samples, cross_samples=cross_samples,
                          cross_tokens=40 * cross_samples)


class _PerLayer:
    """The pre-grouped AGLLoss path, for comparison: one agl_terms call and two projection matmuls per layer."""

    @staticmethod
    def term_matrix(loss, backend, factors=None):
        from agl.functional import agl_terms

        c, rows = loss.config, []
        for e in loss.entries:
            L, R = (e.A.t(), e.B.t()) if e.binding.fan_in_fan_out else (e.B, e.A)
            F, H, U, V = loss._tensors(e, L.device, L.dtype)
            L_al = L if U is None else U @ (U.t() @ L)
            R_al = R if V is None else (R @ V) @ V.t()
            t = agl_terms(L, R, L_al, R_al, fisher=F, task_metric=H, scale=e.scaling, beta=c.beta, tau=c.tau,
                          sharpness=c.sharpness, eps=c.eps, backend=backend)
            rows.append(torch.stack(list(t)))
        return torch.stack(rows)


def _null_grouped(Bs, As, B_aligns=None, A_aligns=None, *, Us=None, Vs=None, fishers=None, task_metrics=None,
                  scales, beta=4.0, tau=0.01, sharpness=100.0, eps=1e-12, backend="auto"):
    """agl_terms_grouped with the do-nothing op (same argument handling, same autograd wiring)."""
    from agl import ops
    from agl._checks import grouped_lists

    x = grouped_lists(Bs, As, B_aligns, A_aligns, Us, Vs, fishers, task_metrics, scales)
    args = [x[k] for k in ("Bs", "As", "B_aligns", "A_aligns", "Us", "Vs", "fishers", "task_metrics", "scales")]
    return ops.agl_terms_grouped_kernel(*args, beta, tau, sharpness, eps, null=True)


@contextlib.contextmanager
def _provider(kind):
    """AGLLoss with the per-layer path or the null op for the duration of a step (bench only)."""
    import agl.loss as agl_loss

    if kind == "per-layer":
        orig = agl_loss.AGLLoss._term_matrix
        agl_loss.AGLLoss._term_matrix = _PerLayer.term_matrix
        try:
            yield
        finally:
            agl_loss.AGLLoss._term_matrix = orig
    elif kind == "null":
        orig = agl_loss.agl_terms_grouped
        agl_loss.agl_terms_grouped = _null_grouped
        try:
            yield
        finally:
            agl_loss.agl_terms_grouped = orig
    else:
        yield


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per configuration (after 1 warm-up)")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--rank", type=int, default=16, help="rank of the synthetic state's U and V (k = k')")
    ap.add_argument("--cross-samples", type=int, default=48, help="N of the synthetic cross curvature")
    ap.add_argument("--skip", default="", help="comma list of configurations to leave out: torch, per-layer, null")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "bench_loss.json"))
    args = ap.parse_args(argv)
    prov = provenance()  # at the start: the load the run began under

    from agl import ops
    from agl.loss import AGLConfig, AGLLoss, resolve_backend

    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args.layers)
    state = synthetic_state(model, rank=args.rank, cross_samples=args.cross_samples)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 49152, (args.batch, args.seq), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    have_kernel = resolve_backend("auto", torch.device("cpu")) == "kernel"
    # name -> (backend, provider)
    skip = set(filter(None, args.skip.split(",")))
    if skip - {"torch", "per-layer", "null"}:
        ap.error(f"--skip: unknown configuration(s) {sorted(skip - {'torch', 'per-layer', 'null'})}")
    configs = {"plain LoRA": (None, None)}
    if "torch" not in skip:
        configs["+AGLLoss torch"] = ("torch", None)
    if have_kernel:
        configs["+AGLLoss kernel"] = ("kernel", None)
        if "per-layer" not in skip:
            configs["+AGLLoss kernel per-layer"] = ("kernel", "per-layer")
        if "null" not in skip and ops.has_null_ops():  # a bench/test build (AGL_BENCH_OPS=1, `make build`)
            configs["+AGLLoss null op"] = ("kernel", "null")
        configs["+AGLLoss kernel cross"] = ("kernel", None)
        configs["+AGLLoss cross only"] = ("kernel", None)
    # "kernel cross" keeps a task weight so the grouped op runs beside the cross term; "cross only" is the default
    # config (λ_T = λ_NC = 0: the op is skipped)
    cross = {"+AGLLoss kernel cross": AGLConfig(backend="kernel", curvature="cross", lambda_task=1.0),
             "+AGLLoss cross only": AGLConfig(backend="kernel", curvature="cross", lambda_task=0.0, lambda_collision=0.0)}
    losses = {name: (AGLLoss(model, state, cross.get(name) or AGLConfig(backend=be)) if be else None)
              for name, (be, _) in configs.items()}

    def step(L):
        loss = model(**batch).loss
        if L is not None:
            loss = L(loss)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def reg_only(L):
        L.regularizer().backward()
        opt.zero_grad(set_to_none=True)

    times = {name: [] for name in configs}
    cpu = {name: [] for name in configs}
    reg_times = {name: [] for name in configs if configs[name][0]}
    load_before = os.getloadavg()
    for name, L in losses.items():
        with _provider(configs[name][1]):
            step(L)  # warm-up
            if L is not None:
                reg_only(L)
    for _ in range(args.steps):  # interleave configurations so machine-load drift hits all alike
        for name, L in losses.items():
            with _provider(configs[name][1]):
                t0, c0 = time.perf_counter(), time.process_time()
                step(L)
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
                if L is not None:
                    t0 = time.perf_counter()
                    reg_only(L)
                    reg_times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["plain LoRA"])
    base_cpu = statistics.median(cpu["plain LoRA"])
    rows = {}
    for name in configs:
        med = statistics.median(times[name])
        mc = statistics.median(cpu[name])
        rows[name] = {"median_step_s": med, "step_times_s": times[name], "overhead_pct": 100 * (med - base) / base,
                      "median_step_cpu_s": mc, "overhead_cpu_pct": 100 * (mc - base_cpu) / base_cpu}
        if name in reg_times:
            rows[name]["regularizer_fwd_bwd_s"] = statistics.median(reg_times[name])
            rows[name]["regularizer_overhead_pct"] = 100 * rows[name]["regularizer_fwd_bwd_s"] / base
    n_layers = len(next(L for L in losses.values() if L is not None).entries)
    print(f"One training step, SmolLM2-135M-shaped Llama ({args.layers} layers, {n_layers} LoRA layers r=8), batch "
          f"{args.batch} x {args.seq} tokens, {torch.get_num_threads()} CPU threads, load average "
          f"{load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"{'configuration':<27}{'step s':>10}{'overhead':>10}{'CPU s':>9}{'CPU ovh':>9}{'reg fwd+bwd s':>15}"
          f"{'reg / step':>12}")
    for name, r in rows.items():
        rs = r.get("regularizer_fwd_bwd_s")
        print(f"{name:<27}{r['median_step_s']:>10.3f}{r['overhead_pct']:>9.1f}%{r['median_step_cpu_s']:>9.2f}"
              f"{r['overhead_cpu_pct']:>8.1f}%"
              + (f"{rs:>15.4f}{r['regularizer_overhead_pct']:>11.1f}%" if rs is not None else ""))
    if not have_kernel:
        print("(kernel backends skipped: agl's compiled extension is not built)")
    row = {"bench": "agl_loss_overhead", **{k: v for k, v in vars(args).items() if k != "out"},
           "threads": torch.get_num_threads(), "lora_layers": n_layers, "results": rows, "kernel": have_kernel,
           "torch": torch.__version__, "load_avg_before": list(load_before)}
    append_rows(args.out, [row], prov, key=ROW_KEY)
    return 0


if __name__ == "__main__":
    sys.exit(main())
