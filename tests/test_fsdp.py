"""FSDP2: 2 CPU processes on gloo (tests/_tiny.py's peft Llama, float64, ``fully_shard`` per decoder layer then the
root). One spawn runs everything the ranks do (process start-up dominates on a loaded box); the parent then repeats
it in one process and compares:

- AGLLoss under FSDP2, each rank holding half of every layer's Fisher rows: value and LoRA gradients equal the
  single-process ones for several optimiser steps (kernel and torch backends; a sharded state and a whole one);
- ``estimate_alignment_state`` on the FSDP2 model: the row blocks concatenated equal the single-process state,
  each rank holding about half of the Fisher;
- the sharded state saved at world size 2 loads in one process exactly, and a state saved in one process loads at
  world size 2 exactly (each rank its rows);
- uneven rows through the collectives: at world size 3 with LoRA rank 2 every Fisher has m % 3 != 0 rows (64, 32)
  and every lora_A (2 rows) has fewer rows than ranks, so rank 2 holds an empty shard of it; the regulariser's value
  and gradients over SGD steps still equal the single-process ones. (The regulariser alone: FSDP2's own task
  gradients at world size 3 differ from one process by ~1e-7 relative even in float64, with no agl code involved.)
"""
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

STEPS, N_SAMPLES, BATCH, LR = 3, 7, 3, 0.1
RHO = 3.0  # AGLConfig.l2(RHO): the identity metric (L2-SP) under FSDP2
UNEVEN_WORLD, UNEVEN_R = 3, 2  # rows 64 and 32 over 3 ranks; lora_A's 2 rows over 3 ranks (one rank holds none)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_state(model, seed: int = 3):
    """A whole AlignmentState with a positive random Fisher and random orthonormal U (m x 3), V (n x 3)."""
    from agl.peft_binding import find_lora_layers
    from agl.state import AlignmentState, LayerState

    g = torch.Generator().manual_seed(seed)
    layers = {}
    for b in find_lora_layers(model):
        m, n = b.shape
        F = torch.rand(m, n, generator=g, dtype=torch.float64) + 0.5
        U = torch.linalg.qr(torch.randn(m, 3, generator=g, dtype=torch.float64))[0]
        V = torch.linalg.qr(torch.randn(n, 3, generator=g, dtype=torch.float64))[0]
        layers[b.name] = LayerState(F, U, V)
    return AlignmentState(layers, num_samples=5, fisher_scale=1.0, num_tokens=40)


def random_cross_state(model, n: int = 5, seed: int = 7):
    """random_state with projected per-sample gradients C (n x 3 x 3 per layer) for the cross-layer metric."""
    st = random_state(model)
    g = torch.Generator().manual_seed(seed)
    for ls in st.layers.values():
        ls.C = 0.3 * torch.randn(n, 3, 3, generator=g, dtype=torch.float64)
    st.cross_samples, st.cross_tokens = n, 11 * n
    return st


CROSS_CONFIGS = {"cross": dict(curvature="cross", lambda_align=2.0),  # the grouped op skipped: the cross term alone
                 "cross_task": dict(curvature="cross", lambda_align=2.0, lambda_task=0.5, backend="torch")}


def _cross(model, name):
    from agl.loss import AGLConfig, AGLLoss

    return AGLLoss(model, random_cross_state(model), AGLConfig(**CROSS_CONFIGS[name]))


def fsdp2(model):
    from torch.distributed.fsdp import fully_shard

    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def lora_params(model):
    return [(n, p) for n, p in model.named_parameters() if "lora_" in n]


def _rank_weights(world: int):
    """Per-rank weights on the regulariser (the single process takes their mean, as DDP averages gradients)."""
    return {2: (0.5, 2.0), 3: (0.5, 2.0, 1.25)}[world]


def train_steps(model, agl_loss, batches, world: int, rank: int, ranks_of_data: int = 2, with_task: bool = True):
    """The regulariser's own gradients, then STEPS steps of SGD on task loss + regulariser (each rank takes
    batches[rank]; one process: the mean of all; without ``with_task`` the regulariser alone), then the gradients of a
    per-rank weighted regulariser. Returns [(regulariser value, {lora param name: whole gradient})].
    ``ranks_of_data``: the world size the single-process run stands for (its regulariser weight is the mean of that
    world's weights)."""
    opt = torch.optim.SGD([p for _, p in lora_params(model)], lr=LR)

    def record():
        grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
                 for n, p in lora_params(model)}
        return torch.tensor(agl_loss.last_terms["regularizer"], dtype=torch.float64), grads

    agl_loss.regularizer().backward()
    out = [record()]
    for _ in range(STEPS):
        opt.zero_grad()
        if with_task:
            mine = [batches[rank]] if world > 1 else batches
            agl_loss(sum(model(**b).loss for b in mine) / len(mine)).backward()
        else:
            agl_loss.regularizer().backward()
        out.append(record())
        opt.step()
    # per-rank weights on the regulariser (trainer_loss weighs it by each rank's share of the tokens): the gradient
    # is the mean over ranks, as DDP / FSDP2 average the task gradients; one process takes the mean weight
    opt.zero_grad()
    weights = _rank_weights(world if world > 1 else ranks_of_data)
    w = weights[rank] if world > 1 else sum(weights) / len(weights)
    (w * agl_loss.regularizer()).backward()
    out.append(record())
    return out


def _dump(st) -> dict:
    return {"layers": {n: (ls.fisher, ls.U, ls.V, ls.S_out, ls.S_in) for n, ls in st.layers.items()},
            "rows": {n: st.layer_rows(n) for n in st.layers}, "bytes": st.fisher_bytes(), "rank": st.rank,
            "world": st.world_size, "meta": (st.num_samples, st.num_tokens, st.fisher_scale)}


def single_process_state():
    from agl.fisher import estimate_alignment_state

    return estimate_alignment_state(tiny_llama(dtype=torch.float64, init_b=0.05), tiny_batches(N_SAMPLES, BATCH),
                                    progress=False, dtype=torch.float64, keep_moments=True)


def _worker(rank: int, world: int, port: int, out_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from agl.loss import AGLConfig, AGLLoss
        from agl.sharded_state import ShardedAlignmentState

        batches = tiny_batches(2 * BATCH, BATCH)
        res = {}
        whole = random_state(tiny_llama(dtype=torch.float64, init_b=0.05))
        # kernel backend with this rank's rows of the state and a task Fisher; torch backend with the whole state
        sharded = ShardedAlignmentState.shard(whole)
        task_fisher = ShardedAlignmentState.shard(random_state(tiny_llama(dtype=torch.float64), seed=5))
        for backend, st, H in (("kernel", sharded, task_fisher), ("torch", whole, "ones")):
            model = fsdp2(tiny_llama(dtype=torch.float64, init_b=0.05))
            L = AGLLoss(model, st, AGLConfig(backend=backend, task_metric=H))
            res[backend] = train_steps(model, L, batches, world, rank)
        model = fsdp2(tiny_llama(dtype=torch.float64, init_b=0.05))  # L2-SP: the whole factors' Gram matrices
        res["l2"] = train_steps(model, AGLLoss(model, whole, AGLConfig.l2(RHO)), batches, world, rank)
        model = fsdp2(tiny_llama(dtype=torch.float64, init_b=0.05))  # EWC: the whole ΔW, this rank's Fisher rows
        res["ewc"] = train_steps(model, AGLLoss(model, sharded, AGLConfig.ewc(lambda_align=1e3)), batches, world, rank)
        for name in CROSS_CONFIGS:  # the cross-layer metric: gathered factors, the whole C on every rank
            model = fsdp2(tiny_llama(dtype=torch.float64, init_b=0.05))
            res[name] = train_steps(model, _cross(model, name), batches, world, rank)
        # Fisher estimation on the FSDP2 model, its save at world size 2, and loads of single-process saves
        from agl.fisher import estimate_alignment_state

        model = fsdp2(tiny_llama(dtype=torch.float64, init_b=0.05))
        est = estimate_alignment_state(model, tiny_batches(N_SAMPLES, BATCH), progress=False, dtype=torch.float64,
                                       keep_moments=True)
        res["estimate"] = _dump(est)
        try:  # the cross curvature's second pass is single-process: refused before any Fisher pass
            estimate_alignment_state(model, tiny_batches(N_SAMPLES, BATCH), progress=False, cross_curvature=True)
            res["cross_estimate"] = "no error"
        except NotImplementedError as err:
            res["cross_estimate"] = str(err)
        est.save(os.path.join(out_dir, "saved_at_2"), fisher_dtype=torch.float64)
        res["loaded_dir"] = _dump(ShardedAlignmentState.load(os.path.join(out_dir, "saved_at_1")))
        res["loaded_file"] = _dump(ShardedAlignmentState.load(os.path.join(out_dir, "whole")))
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _uneven_worker(rank: int, world: int, port: int, out_dir: str):
    """The loss equivalence of ``_worker`` at a world size that splits no layer evenly."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = {}
        for backend, st, H in _states(world, sharded=True):
            model = fsdp2(tiny_llama(dtype=torch.float64, init_b=0.05, r=UNEVEN_R))
            res[backend] = train_steps(model, _loss(model, st, backend, H), None, world, rank, world, with_task=False)
        model = fsdp2(tiny_llama(dtype=torch.float64, init_b=0.05, r=UNEVEN_R))
        res["l2"] = train_steps(model, _l2(model), None, world, rank, world, with_task=False)
        model = fsdp2(tiny_llama(dtype=torch.float64, init_b=0.05, r=UNEVEN_R))
        res["cross"] = train_steps(model, _cross(model, "cross"), None, world, rank, world, with_task=False)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _states(world: int, sharded: bool):
    """(backend, state, task metric) pairs of the uneven case: the kernel backend with row-sharded states (when
    ``sharded``), the torch backend with the whole state."""
    from agl.sharded_state import ShardedAlignmentState

    whole = random_state(tiny_llama(dtype=torch.float64, init_b=0.05, r=UNEVEN_R))
    H = random_state(tiny_llama(dtype=torch.float64, r=UNEVEN_R), seed=5)
    shard = ShardedAlignmentState.shard if sharded else (lambda s: s)
    return (("kernel", shard(whole), shard(H)), ("torch", whole, "ones"))


def _loss(model, st, backend, H):
    from agl.loss import AGLConfig, AGLLoss

    return AGLLoss(model, st, AGLConfig(backend=backend, task_metric=H))


def _l2(model):
    from agl.loss import AGLConfig, AGLLoss

    st = random_state(model)  # the identity metric reads no Fisher; AGLLoss still checks the state's layers
    return AGLLoss(model, st, AGLConfig.l2(RHO))


@pytest.fixture(scope="module")
def uneven_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_uneven")
    mp.spawn(_uneven_worker, args=(UNEVEN_WORLD, _free_port(), str(out)), nprocs=UNEVEN_WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(UNEVEN_WORLD)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    from agl.sharded_state import ShardedAlignmentState

    out = tmp_path_factory.mktemp("fsdp")
    single = single_process_state()
    ShardedAlignmentState.shard(single, 0, 1).save(str(out / "saved_at_1"), fisher_dtype=torch.float64)
    single.save(str(out / "whole"), fisher_dtype=torch.float64)
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return {"dir": out, "single": single, "ranks": [torch.load(out / f"rank{r}.pt") for r in range(2)]}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["kernel", "torch"])
def test_loss_and_gradients_equal_single_process(ranks, backend):
    from agl.loss import AGLConfig, AGLLoss
    from agl.state import AlignmentState

    _skip_without_kernel(backend)
    batches = tiny_batches(2 * BATCH, BATCH)
    whole = random_state(tiny_llama(dtype=torch.float64, init_b=0.05))
    H = random_state(tiny_llama(dtype=torch.float64), seed=5) if backend == "kernel" else "ones"
    model = tiny_llama(dtype=torch.float64, init_b=0.05)
    single = train_steps(model, AGLLoss(model, whole, AGLConfig(backend=backend, task_metric=H)), batches, 1, 0)
    assert isinstance(whole, AlignmentState)
    _assert_ranks_equal_single(ranks["ranks"], backend, single)


@pytest.mark.slow
def test_l2_and_ewc_equal_single_process(ranks, uneven_ranks):
    """The baselines' configs under FSDP2: AGLConfig.l2 (½ρ·Σ‖ΔW‖², from r x r Gram matrices of the gathered
    factors) at world size 2 with the task loss and at world size 3 where a rank holds no lora_A row, and
    AGLConfig.ewc (the Fisher on the whole ΔW, each rank its rows): value and gradients equal one process's."""
    from agl.loss import AGLConfig, AGLLoss

    batches = tiny_batches(2 * BATCH, BATCH)
    model = tiny_llama(dtype=torch.float64, init_b=0.05)
    _assert_ranks_equal_single(ranks["ranks"], "l2", train_steps(model, _l2(model), batches, 1, 0))
    model = tiny_llama(dtype=torch.float64, init_b=0.05)
    ewc = AGLLoss(model, random_state(model), AGLConfig.ewc(lambda_align=1e3))
    _assert_ranks_equal_single(ranks["ranks"], "ewc", train_steps(model, ewc, batches, 1, 0))
    model = tiny_llama(dtype=torch.float64, init_b=0.05, r=UNEVEN_R)
    single = train_steps(model, _l2(model), None, 1, 0, UNEVEN_WORLD, with_task=False)
    _assert_ranks_equal_single(uneven_ranks, "l2", single)


@pytest.mark.slow
def test_cross_curvature_equals_single_process(ranks, uneven_ranks):
    """AGLConfig(curvature="cross") under FSDP2 (every rank the whole C and the gathered factors; z couples the
    layers): alone (the grouped op skipped) and beside the row-sharded task term at world size 2 with the task loss,
    and alone at world size 3 where a rank holds no lora_A row: value and gradients equal one process's."""
    batches = tiny_batches(2 * BATCH, BATCH)
    for name in CROSS_CONFIGS:
        model = tiny_llama(dtype=torch.float64, init_b=0.05)
        _assert_ranks_equal_single(ranks["ranks"], name, train_steps(model, _cross(model, name), batches, 1, 0))
    model = tiny_llama(dtype=torch.float64, init_b=0.05, r=UNEVEN_R)
    single = train_steps(model, _cross(model, "cross"), None, 1, 0, UNEVEN_WORLD, with_task=False)
    _assert_ranks_equal_single(uneven_ranks, "cross", single)


@pytest.mark.slow
def test_cross_curvature_estimation_refused_on_ranks(ranks):
    """estimate_alignment_state(cross_curvature=True) on the FSDP2 model raises (it used to return a state without C
    after the whole Fisher pass: the check sat after the FSDP2 branch returned)."""
    for r in ranks["ranks"]:
        assert "single process" in r["cross_estimate"] and "world size 2" in r["cross_estimate"]


def test_cross_curvature_refuses_a_sharded_state():
    """A ShardedAlignmentState stores no C: the cross metric says so instead of "estimate it with C"."""
    from agl.loss import AGLConfig, AGLLoss
    from agl.sharded_state import ShardedAlignmentState

    model = tiny_llama(dtype=torch.float64, init_b=0.05)
    sharded = ShardedAlignmentState.shard(random_cross_state(model), 0, 1)
    with pytest.raises(NotImplementedError, match="whole AlignmentState"):
        AGLLoss(model, sharded, AGLConfig(curvature="cross"))


def _skip_without_kernel(backend):
    from agl.functional import kernel_supports

    if backend == "kernel" and not kernel_supports("cpu"):
        pytest.skip("the compiled extension is not built")


def _assert_ranks_equal_single(rank_results, backend, single):
    for step, (reg, grads) in enumerate(single):
        for r in rank_results:
            reg_r, grads_r = r[backend][step]
            torch.testing.assert_close(reg_r, reg, rtol=1e-12, atol=0, msg=f"step {step}")
            assert grads_r.keys() == grads.keys()
            for n, g in grads.items():
                torch.testing.assert_close(grads_r[n], g, rtol=1e-10, atol=1e-14, msg=f"step {step} {n}")
        assert reg > 0 and any(g.abs().sum() > 0 for g in grads.values())


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["kernel", "torch"])
def test_uneven_rows_equal_single_process(uneven_ranks, backend):
    from agl.distributed import row_range

    _skip_without_kernel(backend)
    st, H = next((st, H) for b, st, H in _states(1, sharded=False) if b == backend)
    # the case really is uneven: no Fisher splits evenly, and one rank holds no row of lora_A
    assert all(ls.shape[0] % UNEVEN_WORLD for ls in st.layers.values())
    assert row_range(UNEVEN_R, UNEVEN_WORLD - 1, UNEVEN_WORLD) == (UNEVEN_R, UNEVEN_R)
    model = tiny_llama(dtype=torch.float64, init_b=0.05, r=UNEVEN_R)
    single = train_steps(model, _loss(model, st, backend, H), None, 1, 0, UNEVEN_WORLD, with_task=False)
    _assert_ranks_equal_single(uneven_ranks, backend, single)


def _rows_concatenated(ranks, key):
    names = ranks[0][key]["layers"]
    return {n: torch.cat([r[key]["layers"][n][0] for r in ranks]) for n in names}


@pytest.mark.slow
def test_fisher_state_equals_single_process(ranks):
    single, rs = ranks["single"], ranks["ranks"]
    F = _rows_concatenated(rs, "estimate")
    assert list(F) == list(single.layers)
    for r in rs:
        assert r["estimate"]["meta"][:2] == (single.num_samples, single.num_tokens) == (N_SAMPLES, r["estimate"]["meta"][1])
        assert r["estimate"]["meta"][2] == pytest.approx(single.fisher_scale, rel=1e-12)
    for name, ls in single.layers.items():
        torch.testing.assert_close(F[name], ls.fisher, rtol=1e-10, atol=1e-13)
        for r in rs:
            _, U, V, S_out, S_in = r["estimate"]["layers"][name]
            # same subspace (eigenvector signs may differ): compare projectors; U / V identical on both ranks
            torch.testing.assert_close(U @ U.T, ls.U @ ls.U.T, rtol=0, atol=1e-8)
            torch.testing.assert_close(V @ V.T, ls.V @ ls.V.T, rtol=0, atol=1e-8)
            if S_out is not None:  # the layer's owner rank keeps the moments
                torch.testing.assert_close(S_out, ls.S_out, rtol=1e-10, atol=1e-18)
                torch.testing.assert_close(S_in, ls.S_in, rtol=1e-10, atol=1e-18)
        assert torch.equal(rs[0]["estimate"]["layers"][name][1], rs[1]["estimate"]["layers"][name][1])
        assert sum(r["estimate"]["layers"][name][3] is not None for r in rs) == 1  # one owner per layer
    # each rank holds half of the Fisher (every layer here has an even number of rows)
    whole_bytes = sum(ls.fisher.numel() * ls.fisher.element_size() for ls in single.layers.values())
    for r in rs:
        assert r["estimate"]["bytes"] == whole_bytes // 2


@pytest.mark.slow
def test_save_at_two_load_at_one_and_back(ranks):
    from agl.sharded_state import ShardedAlignmentState
    from agl.state import AlignmentState

    rs = ranks["ranks"]
    loaded = ShardedAlignmentState.load(str(ranks["dir"] / "saved_at_2"))  # one process: the whole state
    assert isinstance(loaded, AlignmentState) and loaded.world_size == 1
    F = _rows_concatenated(rs, "estimate")
    for name, ls in loaded.layers.items():
        assert torch.equal(ls.fisher, F[name])  # exactly the rows the two ranks held
        assert torch.equal(ls.U, rs[0]["estimate"]["layers"][name][1])
    assert (loaded.num_samples, loaded.num_tokens) == rs[0]["estimate"]["meta"][:2]
    assert loaded.fisher_scale == rs[0]["estimate"]["meta"][2]
    single = ranks["single"]
    for key in ("loaded_dir", "loaded_file"):  # saved by one process, loaded at world size 2: each rank its rows
        for k, r in enumerate(rs):
            assert (r[key]["rank"], r[key]["world"]) == (k, 2)
            for name, ls in single.layers.items():
                r0, r1 = r[key]["rows"][name]
                assert (r0, r1) == ((0, ls.shape[0] // 2) if k == 0 else (ls.shape[0] // 2, ls.shape[0]))
                assert torch.equal(r[key]["layers"][name][0], ls.fisher[r0:r1])
                assert torch.equal(r[key]["layers"][name][1], ls.U)
