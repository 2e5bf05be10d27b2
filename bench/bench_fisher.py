"""Fisher estimation throughput: per-sample gradients from hooks (one backward per batch) vs the brute-force loop
(one backward per sample, squaring W0.grad), same model, same samples, batch 8. Target: hooks >= 5x. Also the
hooks with ``cross_curvature=True`` (a second pass storing C = Uᵀ G V per sample, agl.curvature): target <= 2x the
hooks alone.

    python bench/bench_fisher.py [--hidden 128 --layers 2 --seq 64 --samples 32 --batch 8 --repeat 3]
                                 [--threads N] [--device cuda]

Both methods do the same arithmetic per sample (a T x m x n product for G_i, or for W0.grad, plus the same moment
updates and one eigh per layer); the hooks save the per-sample passes' fixed costs and use batch-8 matmuls. On a
few CPU cores, where a single 64-token sample already keeps the matmuls busy, the gain is therefore smaller than on a
GPU, where a batch-1 pass leaves the device mostly idle. Prints a table and adds a row to
bench/results/bench_fisher.json (bench/_results.py: one row per configuration and commit, with provenance).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
from _results import append_rows, provenance  # noqa: E402  (bench/_results.py, same directory)

ROW_KEY = ("bench", "device", "threads", "hidden", "layers", "vocab", "seq", "samples", "batch")


def build(hidden: int, layers: int, vocab: int, r: int):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 192),
                      vocab_size=vocab, max_position_embeddings=1024)
    model = LlamaForCausalLM(cfg)
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))


def batches(n: int, bs: int, T: int, vocab: int):
    g = torch.Generator().manual_seed(0)
    out = []
    for s in range(0, n, bs):
        ids = torch.randint(0, vocab, (min(bs, n - s), T), generator=g)
        labels = ids.clone()
        labels[:, : T // 2] = -100  # prompt half
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "bench_fisher.json"))
    args = ap.parse_args(argv)
    prov = provenance()  # at the start: the load the run began under

    from agl.fisher import estimate_alignment_state, estimate_alignment_state_loop

    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args.hidden, args.layers, args.vocab, 8).to(args.device)
    data = batches(args.samples, args.batch, args.seq, args.vocab)

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
    runs = {
        "hooks": lambda: estimate_alignment_state(model, data, progress=False),
        "hooks + cross": lambda: estimate_alignment_state(model, data, progress=False, cross_curvature=True),
        "per-sample loop": lambda: estimate_alignment_state_loop(model, data),
    }
    results = {}
    for name, fn in runs.items():
        fn() if name.startswith("hooks") else None  # warm-up (allocator, kernels)
        times, cpu = [], []
        for _ in range(args.repeat):
            t0, c0 = time.perf_counter(), time.process_time()
            st = fn()
            sync()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        results[name] = {"median_s": statistics.median(times), "samples_per_s": args.samples / statistics.median(times),
                         "times_s": times, "median_cpu_s": statistics.median(cpu), "cpu_times_s": cpu}
        results[name]["state"] = st
    results["hooks + cross"].pop("state")
    cross_cost = results["hooks + cross"]["median_s"] / results["hooks"]["median_s"]
    a, b = results["hooks"].pop("state"), results["per-sample loop"].pop("state")
    err = max(float((a.layers[n].fisher - b.layers[n].fisher).abs().max() / b.layers[n].fisher.abs().max()) for n in a.layers)
    speedup = results["hooks"]["samples_per_s"] / results["per-sample loop"]["samples_per_s"]
    speedup_cpu = results["per-sample loop"]["median_cpu_s"] / results["hooks"]["median_cpu_s"]
    print(f"Fisher estimation: Llama hidden {args.hidden}, {args.layers} layers, LoRA q/k/v/o, {args.samples} samples "
          f"x {args.seq} tokens, batch {args.batch}, {args.device}, {torch.get_num_threads()} threads")
    print(f"{'method':<18}{'samples/s':>12}{'median s':>12}{'CPU s':>10}")
    for name, r in results.items():
        print(f"{name:<18}{r['samples_per_s']:>12.2f}{r['median_s']:>12.3f}{r['median_cpu_s']:>10.2f}")
    print(f"speed-up {speedup:.1f}x wall, {speedup_cpu:.1f}x process CPU time (target >= 5x); "
          f"max rel. difference of F {err:.1e}")
    print(f"with the cross curvature (a second pass for C): {cross_cost:.2f}x the Fisher alone (goal <= 2x)")
    row = {"bench": "fisher", **{k: v for k, v in vars(args).items() if k not in ("out", "threads")},
           "threads": torch.get_num_threads(), "results": results, "speedup": speedup,
           "speedup_cpu_time": speedup_cpu, "max_rel_diff_F": err, "cross_cost": cross_cost, "torch": torch.__version__}
    append_rows(args.out, [row], prov, key=ROW_KEY)
    return 0


if __name__ == "__main__":
    sys.exit(main())
