"""Row sharding without a process group: row ranges, the row-block sums, ShardedAlignmentState files (resharding,
checksums, errors) and the errors that point ZeRO-3 / FSDP1 users to FSDP2."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _tiny import tiny_llama  # noqa: E402
from test_fsdp import random_state  # noqa: E402

from agl.distributed import row_range  # noqa: E402
from agl.reference import agl_sums, agl_terms, terms_from_sums  # noqa: E402
from agl.sharded_state import MANIFEST, ShardedAlignmentState  # noqa: E402


@pytest.mark.parametrize("m,world", [(64, 2), (7, 3), (1, 2), (5, 8), (32, 1)])
def test_row_range_is_torch_chunk(m, world):
    blocks = torch.arange(m).chunk(world)
    for rank in range(world):
        r0, r1 = row_range(m, rank, world)
        want = blocks[rank].tolist() if rank < len(blocks) else []
        assert list(range(r0, r1)) == want


def test_row_block_sums_add_up_to_the_whole():
    g = torch.Generator().manual_seed(0)
    m, n, r = 9, 7, 3
    B, A = torch.randn(m, r, generator=g, dtype=torch.float64), torch.randn(r, n, generator=g, dtype=torch.float64)
    Ba, Aa = torch.randn(m, 2, generator=g, dtype=torch.float64), torch.randn(2, n, generator=g, dtype=torch.float64)
    F, H = torch.rand(m, n, generator=g, dtype=torch.float64), torch.rand(m, n, generator=g, dtype=torch.float64)
    whole = agl_sums(B, A, Ba, Aa, fisher=F, task_metric=H, scale=2.0)
    parts = [agl_sums(B[a:b], A, Ba[a:b], Aa, fisher=F[a:b], task_metric=H[a:b], scale=2.0)
             for a, b in (row_range(m, k, 3) for k in range(3))]
    torch.testing.assert_close(sum(parts), whole, rtol=1e-13, atol=0)
    ref = agl_terms(B, A, Ba, Aa, fisher=F, task_metric=H, scale=2.0)
    torch.testing.assert_close(terms_from_sums(sum(parts), m * n, 1e-12), torch.stack(list(ref)), rtol=1e-13, atol=0)
    from agl import ops

    if ops.available():  # the fused op's sums of a row block are the same sums
        k_sums = [torch.ops.agl.terms_fwd(B[a:b], A, Ba[a:b], Aa, F[a:b], H[a:b], None, 2.0, 4.0, 0.01, 100.0, 1e-12)[1]
                  for a, b in (row_range(m, k, 3) for k in range(3))]
        torch.testing.assert_close(sum(k_sums), whole, rtol=1e-12, atol=0)


@pytest.fixture(scope="module")
def whole():
    return random_state(tiny_llama(dtype=torch.float64))


def test_save_one_process_load_any_world(tmp_path, whole):
    ShardedAlignmentState.shard(whole, 0, 1).save(str(tmp_path / "s"), fisher_dtype=torch.float64)
    assert sorted(os.listdir(tmp_path / "s")) == sorted([MANIFEST, "fisher-00000-of-00001.safetensors", "subspaces.safetensors"])
    for world in (1, 2, 3):
        for rank in range(world):
            st = ShardedAlignmentState.load(str(tmp_path / "s"), rank=rank, world_size=world)
            assert (st.rank, st.world_size, st.num_samples, st.fisher_scale) == (rank, world, 5, 1.0)
            for name, ls in whole.layers.items():
                r0, r1 = st.layer_rows(name)
                assert torch.equal(st.layers[name].fisher, ls.fisher[r0:r1])
                assert torch.equal(st.layers[name].U, ls.U) and torch.equal(st.layers[name].V, ls.V)
    # a whole-state file reshards the same way
    whole.save(str(tmp_path / "w"), fisher_dtype=torch.float64)
    st = ShardedAlignmentState.load(str(tmp_path / "w"), rank=1, world_size=3)
    for name, ls in whole.layers.items():
        r0, r1 = row_range(ls.shape[0], 1, 3)
        assert torch.equal(st.layers[name].fisher, ls.fisher[r0:r1])


def test_memory_per_rank_and_check(whole):
    half = [ShardedAlignmentState.shard(whole, k, 2) for k in range(2)]
    total = sum(ls.fisher.numel() * ls.fisher.element_size() for ls in whole.layers.values())
    assert [h.fisher_bytes() for h in half] == [total // 2, total // 2]
    model = tiny_llama(dtype=torch.float64)
    half[1].check(model)  # against the whole shapes
    bad = ShardedAlignmentState.shard(whole, 1, 2)
    name = next(iter(bad.layers))
    bad.layers[name].fisher = bad.layers[name].fisher[1:]
    with pytest.raises(ValueError, match="Fisher block"):
        bad.check(model)


def test_corrupt_shard_is_named(tmp_path, whole):
    ShardedAlignmentState.shard(whole, 0, 1).save(str(tmp_path / "s"))
    f = tmp_path / "s" / "fisher-00000-of-00001.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0x40  # a bit of the last tensor's data
    f.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="corrupt.*fisher"):
        ShardedAlignmentState.load(str(tmp_path / "s"))
    with pytest.raises(ValueError, match="no alignment state"):
        ShardedAlignmentState.load(str(tmp_path / "nothing"))
    man = tmp_path / "s" / MANIFEST
    meta = json.loads(man.read_text())
    meta["format"] = "something else"
    man.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="not a sharded alignment state"):
        ShardedAlignmentState.load(str(tmp_path / "s"))


def test_sharded_state_needs_its_process_group(whole):
    from agl.loss import AGLLoss

    with pytest.raises(ValueError, match="not initialised"):
        AGLLoss(tiny_llama(dtype=torch.float64), ShardedAlignmentState.shard(whole, 1, 2))


@pytest.mark.parametrize("mark,what", [("ds_id", "ZeRO-3"), ("_is_flat_param", "FSDP1")])
def test_zero3_and_fsdp1_point_to_fsdp2(whole, mark, what):
    from agl.loss import AGLLoss

    model = tiny_llama(dtype=torch.float64)
    setattr(next(p for n, p in model.named_parameters() if "lora_B" in n), mark, True)
    with pytest.raises(NotImplementedError, match=f"{what}.*FSDP2"):
        AGLLoss(model, whole)
