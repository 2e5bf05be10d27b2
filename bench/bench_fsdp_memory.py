"""Memory per rank of the alignment state and the regulariser: one process (whole Fisher) vs FSDP2 on 2 gloo ranks
(Fisher sharded by rows), on a Llama-shaped peft model built in code; plus the same arithmetic for a 70B-shaped
layer set on 8 ranks.

    python bench/bench_fsdp_memory.py [--hidden 1024 --layers 8 --kv-heads 4 --samples 8 --seq 32 --r 8]

Per rank it records
- ``state_fisher_bytes`` / ``state_subspace_bytes``: the bytes the state's tensors hold (Fisher rows; U and V,
  which every rank holds whole) — exact, and checked against :func:`state_bytes` (the arithmetic used for 70B);
- ``estimate_peak_mib``: the rise of the process's peak resident memory (VmHWM, reset through
  /proc/self/clear_refs) while ``estimate_alignment_state`` runs;
- ``load_peak_mib``: the rise of peak resident memory while loading the saved state (``ShardedAlignmentState.load``:
  this rank's rows, read and verified in row blocks); it counts the file pages safetensors maps while reading, so
  about twice the rows read;
- ``agl_loss_init_peak_mib``: the rise of peak resident memory while building ``AGLLoss`` (it checks the state and
  takes ‖W0‖² of the base weights in float64, the local rows under FSDP2);
- ``regularizer_peak_mib``: the same over one forward + backward of the regulariser (kernel backend), the second
  call (the first fills caches and the collectives' buffers).
RSS figures are rounded to pages and include whatever else the step allocates (activations, per-sample
gradients, collective buffers); the state bytes are exact. Rows go to
bench/results/bench_fsdp_memory.json with provenance (bench/_results.py).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import socket
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from _results import RESULTS, append_rows, provenance  # noqa: E402  (bench/_results.py, same directory)

ROW_KEY = ("bench", "kind", "model", "world", "rank")
MIB = 1 << 20


def layer_shapes(hidden: int, layers: int, kv_dim: int):
    """(m, n) of the adapted q, k, v, o weights of every decoder layer (nn.Linear (out, in))."""
    return [s for _ in range(layers) for s in ((hidden, hidden), (kv_dim, hidden), (kv_dim, hidden), (hidden, hidden))]


def state_bytes(shapes, world: int, rank: int, *, fisher_bytes: int, subspace_rank: int, subspace_bytes: int = 4):
    """(Fisher bytes, U/V bytes) a rank holds: rows [r0, r1) of every Fisher (torch.chunk blocks of ceil(m/world)),
    and U (m x k), V (n x k) whole, k = ``subspace_rank`` (at most min(m, max_rank))."""
    from agl.distributed import row_range

    fisher = sum((lambda r: r[1] - r[0])(row_range(m, rank, world)) * n for m, n in shapes) * fisher_bytes
    sub = sum(m * min(m, subspace_rank) + n * min(n, subspace_rank) for m, n in shapes) * subspace_bytes
    return fisher, sub


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


class PeakRSS:
    """The rise of peak resident memory over a block: freed heap memory is returned to the system (malloc_trim) and
    VmHWM reset (clear_refs 5) at entry. With ``MALLOC_MMAP_THRESHOLD_`` fixed (``main`` sets it) every large
    tensor is its own mapping, so resident memory follows the tensors allocated and freed."""

    def __enter__(self):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.base = _rss("VmRSS")
        return self

    def __exit__(self, *exc):
        self.peak = _rss("VmHWM") - self.base
        return False


def build(args, seed=0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    heads = args.hidden // 64
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 2, num_hidden_layers=args.layers,
                      num_attention_heads=heads, num_key_value_heads=args.kv_heads, vocab_size=256,
                      max_position_embeddings=256)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=args.r, lora_alpha=2 * args.r,
                                                               target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    for n, p in model.named_parameters():  # a nonzero update, so the regulariser has gradients
        if "lora_B" in n:
            p.data.normal_(0, 0.01)
    return model


def batches(args):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 256, (args.samples, args.seq), generator=g)
    labels = ids.clone()
    labels[:, : args.seq // 4] = -100
    return [{"input_ids": ids[i: i + 4], "labels": labels[i: i + 4]} for i in range(0, args.samples, 4)]


def measure(rank: int, world: int, args, out_dir: str) -> dict:
    from agl.fisher import estimate_alignment_state
    from agl.loss import AGLConfig, AGLLoss
    from agl.sharded_state import ShardedAlignmentState

    model = build(args)
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    with PeakRSS() as est_mem:
        st = estimate_alignment_state(model, batches(args), progress=False, max_rank=args.max_rank,
                                      chunk_elems=args.chunk_elems)
    if world == 1:
        st = ShardedAlignmentState.shard(st, 0, 1)
    path = os.path.join(out_dir, f"state_w{world}")
    st.save(path)
    fisher = sum(ls.fisher.numel() * ls.fisher.element_size() for ls in st.layers.values())
    sub = sum(t.numel() * t.element_size() for ls in st.layers.values() for t in (ls.U, ls.V) if t is not None)
    del st
    with PeakRSS() as load_mem:
        st = ShardedAlignmentState.load(path)
    with PeakRSS() as init_mem:
        loss = AGLLoss(model, st, AGLConfig(backend="kernel"))
    loss.regularizer().backward()  # first call: caches, the collectives' first buffers
    with PeakRSS() as reg_mem:
        loss.regularizer().backward()
    ranks = [ls.U.shape[1] for ls in st.layers.values() if ls.U is not None]
    return {"state_fisher_bytes": fisher, "state_subspace_bytes": sub, "estimate_peak_mib": est_mem.peak / MIB,
            "load_peak_mib": load_mem.peak / MIB, "agl_loss_init_peak_mib": init_mem.peak / MIB,
            "regularizer_peak_mib": reg_mem.peak / MIB, "subspace_rank_max": max(ranks)}


def _worker(rank: int, world: int, port: int, args, out_dir: str, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results[rank] = measure(rank, world, args, out_dir)
    finally:
        dist.destroy_process_group()


def arithmetic_70b(world: int, max_rank: int = 64):
    """Per-rank bytes of a Llama-70B-shaped state (80 layers, hidden 8192, 8 kv heads of 128: q/o 8192 x 8192,
    k/v 1024 x 8192), bf16 Fisher, float32 U / V of rank ``max_rank``; and the estimation's float64 row
    accumulators plus one whole-layer contribution (the largest, 8192 x 8192 float64) in flight, and the float64
    second moments S_out (m x m), S_in (n x n) the rank owns (layer i on rank i % world; the most any rank holds)."""
    shapes = layer_shapes(8192, 80, 1024)
    moments = [sum((m * m + n * n) * 8 for i, (m, n) in enumerate(shapes) if i % world == k) for k in range(world)]
    rows = []
    for rank in sorted({0, world - 1}):
        fisher, sub = state_bytes(shapes, world, rank, fisher_bytes=2, subspace_rank=max_rank)
        acc, _ = state_bytes(shapes, world, rank, fisher_bytes=8, subspace_rank=max_rank)
        rows.append({"bench": "fsdp_memory", "kind": "arithmetic", "model": "llama-70b-shaped q/k/v/o", "world": world,
                     "rank": rank, "fisher_elements_total": sum(m * n for m, n in shapes),
                     "state_fisher_gib": fisher / 2**30, "state_subspace_gib": sub / 2**30,
                     "estimate_accumulator_gib": (acc + 8192 * 8192 * 8) / 2**30,
                     "estimate_moments_gib_max": max(moments) / 2**30,
                     "fisher_dtype": "bfloat16", "max_rank": max_rank})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--max-rank", type=int, default=16)
    ap.add_argument("--chunk-elems", type=int, default=1 << 21,
                    help="per-sample gradient elements formed at once in estimation (small: the accumulators show)")
    ap.add_argument("--out", default=str(RESULTS / "bench_fsdp_memory.json"))
    ap.add_argument("--arithmetic-only", action="store_true", help="write only the 70B-shaped arithmetic rows")
    args = ap.parse_args()
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != str(1 << 16):  # glibc reads it at start: run again with it
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 16)})
    prov = provenance()
    model_name = f"llama h{args.hidden} L{args.layers} kv{args.kv_heads} r{args.r}"
    shapes = layer_shapes(args.hidden, args.layers, args.kv_heads * 64)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in () if args.arithmetic_only else (1, 2):
            results = mp.Manager().dict() if world > 1 else {}
            if world == 1:
                torch.set_num_threads(1)
                results[0] = measure(0, 1, args, tmp)
            else:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    port = s.getsockname()[1]
                mp.spawn(_worker, args=(world, port, args, tmp, results), nprocs=world, join=True)
            for rank in range(world):
                r = dict(results[rank])
                want, _ = state_bytes(shapes, world, rank, fisher_bytes=4, subspace_rank=0)
                assert r["state_fisher_bytes"] == want, (r["state_fisher_bytes"], want)  # the arithmetic holds
                rows.append({"bench": "fsdp_memory", "kind": "measured", "model": model_name, "world": world,
                             "rank": rank, "fisher_dtype": "float32", "samples": args.samples, "seq": args.seq,
                             "max_rank": args.max_rank, "chunk_elems": args.chunk_elems, **r})
    rows += arithmetic_70b(1) + arithmetic_70b(8)
    print(f"{'kind':10} {'world':>5} {'rank':>4} {'Fisher MiB':>11} {'U/V MiB':>8} {'estimate MiB':>12} "
          f"{'load MiB':>9} {'AGLLoss() MiB':>13} {'regulariser MiB':>15}")
    for r in rows:
        if r["kind"] == "measured":
            print(f"{'measured':10} {r['world']:>5} {r['rank']:>4} {r['state_fisher_bytes'] / MIB:>11.1f} "
                  f"{r['state_subspace_bytes'] / MIB:>8.1f} {r['estimate_peak_mib']:>12.1f} {r['load_peak_mib']:>9.1f} "
                  f"{r['agl_loss_init_peak_mib']:>13.1f} {r['regularizer_peak_mib']:>15.1f}")
        else:
            print(f"{'70B arith':10} {r['world']:>5} {r['rank']:>4} {r['state_fisher_gib'] * 1024:>11.0f} "
                  f"{r['state_subspace_gib'] * 1024:>8.0f} {r['estimate_accumulator_gib'] * 1024:>12.0f}")
    append_rows(args.out, rows, prov, key=ROW_KEY)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
