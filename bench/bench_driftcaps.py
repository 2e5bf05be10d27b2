"""DriftCaps generation throughput on the offline SmolLM2-135M-Instruct model: prompts/s of ``evaluate`` batched vs
one prompt at a time, on a small stratified subset of the built-in eval prompts (greedy, no cache).

    python bench/bench_driftcaps.py [--n 16 --batch 16 --max-new-tokens 32 --device cpu --threads 0]

The default is sized for a quiet CPU; on a loaded 2-core machine use e.g. --n 8 --batch 8.

Prints a table and adds a row to bench/results/driftcaps_<device>.json (bench/_results.py: one row per configuration
and commit). Not a test: numbers depend on the machine and its load (each row's provenance records the CPU, its
cores, the load average at the start and the commit).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
from _results import RESULTS, append_rows, provenance  # noqa: E402  (bench/_results.py)

ROW_KEY = ("bench", "model", "device", "threads", "max_new_tokens", "n_prompts", "batch")


def subset(n: int):
    """n eval prompts: half unsafe (round-robin over categories), half safe (round-robin over kinds), deterministic."""
    from agl.driftcaps import load_prompts

    prompts = load_prompts(split="eval")

    def round_robin(items, k, key):
        groups: dict = {}
        for p in items:
            groups.setdefault(key(p), []).append(p)
        out, i = [], 0
        while len(out) < k and any(i < len(g) for g in groups.values()):
            for g in sorted(groups):
                if i < len(groups[g]) and len(out) < k:
                    out.append(groups[g][i])
            i += 1
        return out

    unsafe = round_robin([p for p in prompts if p.label == "unsafe"], (n + 1) // 2, lambda p: p.category)
    safe = round_robin([p for p in prompts if p.label == "safe"], n // 2, lambda p: p.kind)
    return unsafe + safe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--n", type=int, default=16, help="prompts per measurement")
    ap.add_argument("--batch", type=int, default=16, help="batch size of the batched run")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    prov = provenance()  # at the start: the load the run began under
    if args.threads:
        torch.set_num_threads(args.threads)

    from agl.driftcaps import evaluate
    from agl.models import load_causal_lm

    t = time.perf_counter()
    model, tok = load_causal_lm(args.model, device=args.device)
    load_s = time.perf_counter() - t
    prompts = subset(args.n)
    evaluate(model, tok, prompts[:2], max_new_tokens=4, batch_size=2, progress=False)  # warm-up

    rows = []
    for bs in (args.batch, 1):
        t = time.perf_counter()
        rep = evaluate(model, tok, prompts, max_new_tokens=args.max_new_tokens, batch_size=bs, progress=False)
        dt = time.perf_counter() - t
        n_tok = sum(len(tok(r["response"], add_special_tokens=False)["input_ids"]) for r in rep.records)
        rows.append({"batch_size": bs, "n_prompts": len(prompts), "seconds": round(dt, 2),
                     "prompts_per_s": round(len(prompts) / dt, 3), "new_tokens_per_s": round(n_tok / dt, 1),
                     "rr_unsafe": rep.metrics["rr_unsafe"]["rate"], "over_refusal": rep.metrics["over_refusal"]["rate"]})
        print(f"batch {bs:>3}: {len(prompts)} prompts in {dt:7.1f} s = {len(prompts) / dt:6.3f} prompts/s "
              f"({n_tok / dt:6.1f} generated tokens/s)")
    speedup = rows[0]["prompts_per_s"] / rows[1]["prompts_per_s"]
    print(f"batched speed-up: {speedup:.2f}x (model load {load_s:.1f} s)")
    result = {
        "bench": "driftcaps_evaluate", "model": args.model, "device": args.device,
        "threads": torch.get_num_threads(), "max_new_tokens": args.max_new_tokens, "n_prompts": len(prompts),
        "batch": args.batch, "rows": rows, "batched_speedup": round(speedup, 3), "model_load_s": round(load_s, 1),
        "torch": torch.__version__,
    }
    path = RESULTS / f"driftcaps_{args.device.split(':')[0]}.json"
    append_rows(path, [result], prov, key=ROW_KEY)  # NaN -> null there
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
