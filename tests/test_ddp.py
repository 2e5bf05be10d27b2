"""DDP: 2 CPU processes on gloo. Fisher over N samples split across ranks equals the single-process state, and
AGLLoss gives the same value on both ranks."""
from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
from _tiny import tiny_batches, tiny_llama  # noqa: E402

N_SAMPLES, BATCH = 7, 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from agl.fisher import estimate_alignment_state
        from agl.loss import AGLConfig, AGLLoss

        model = tiny_llama(dtype=torch.float64, init_b=0.05)
        st = estimate_alignment_state(model, tiny_batches(N_SAMPLES, BATCH), progress=False, dtype=torch.float64,
                                      keep_moments=True)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        L = AGLLoss(ddp, st, AGLConfig(backend="torch"))
        val = L(torch.tensor(0.0, dtype=torch.float64))
        torch.save({"state": {n: (ls.fisher, ls.S_out, ls.S_in, ls.U, ls.V) for n, ls in st.layers.items()},
                    "n": st.num_samples, "val": val.detach()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_fisher_and_loss(tmp_path):
    from agl.fisher import estimate_alignment_state
    from agl.loss import AGLConfig, AGLLoss

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    model = tiny_llama(dtype=torch.float64, init_b=0.05)
    single = estimate_alignment_state(model, tiny_batches(N_SAMPLES, BATCH), progress=False, dtype=torch.float64,
                                      keep_moments=True)
    assert r0["n"] == r1["n"] == single.num_samples == N_SAMPLES
    for name, ls in single.layers.items():
        for r in (r0, r1):
            F, S_out, S_in, U, V = r["state"][name]
            torch.testing.assert_close(F, ls.fisher, rtol=1e-10, atol=1e-13)
            torch.testing.assert_close(S_out, ls.S_out, rtol=1e-10, atol=1e-18)
            torch.testing.assert_close(S_in, ls.S_in, rtol=1e-10, atol=1e-18)
            # same subspace (eigenvector signs may differ from the single process): compare projectors
            torch.testing.assert_close(U @ U.T, ls.U @ ls.U.T, rtol=0, atol=1e-8)
            torch.testing.assert_close(V @ V.T, ls.V @ ls.V.T, rtol=0, atol=1e-8)
        for a, b in zip(r0["state"][name], r1["state"][name]):
            assert torch.equal(a, b)  # bit-identical across ranks
    assert torch.equal(r0["val"], r1["val"])
    ref = AGLLoss(model, single, AGLConfig(backend="torch"))(torch.tensor(0.0, dtype=torch.float64))
    torch.testing.assert_close(r0["val"], ref.detach(), rtol=1e-6, atol=0)
