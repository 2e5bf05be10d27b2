"""agl.distributed's row-sharded kernel terms in one process (a gloo group of world size 1): one grouped op call per
step whose sums row l equals the grouped op on the same layers, in float64 whenever any layer is float64."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from agl import ops
from agl.distributed import _KernelRowTerms
from agl.functional import agl_terms_grouped
from agl.reference import terms_from_sums

pytestmark = pytest.mark.skipif(not ops.available(), reason="agl's C++ extension is not built")
SCALARS = (4.0, 0.01, 100.0, 1e-12)


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    store = dist.FileStore(str(tmp_path_factory.mktemp("pg") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def _layers(dtypes):
    g = torch.Generator().manual_seed(0)
    out = []
    for i, dt in enumerate(dtypes):
        m, n, r = 5 + i, 7, 2
        t = [torch.randn(*s, generator=g, dtype=torch.float64).to(dt) for s in ((m, r), (r, n), (m, r), (r, n))]
        out.append((t, torch.rand(m, n, generator=g) + 0.5, float(i + 1)))
    return out


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float64), (torch.float64, torch.float32),
                                    (torch.float32, torch.float32)])
def test_one_grouped_call_and_no_downcast(group, dtypes):
    layers = _layers(dtypes)
    per_layer = [(F, None, t[0].shape[0] * t[1].shape[1], t[0].shape[0], s) for t, F, s in layers]
    flat = [x.clone().requires_grad_() for t, _, _ in layers for x in t]
    T = _KernelRowTerms.apply(group, per_layer, SCALARS, *flat)
    want = torch.float64 if torch.float64 in dtypes else torch.float32
    assert T.dtype == want  # a float64 layer after a float32 one is not rounded to float32
    lists = [[t[k] for t, _, _ in layers] for k in range(4)]
    _, S = torch.ops.agl.terms_grouped_fwd(*lists, [], [], [F for _, F, _ in layers], [], [s for *_, s in layers],
                                           *SCALARS)
    N = torch.tensor([p[2] for p in per_layer], dtype=S.dtype)
    assert torch.equal(T.detach(), terms_from_sums(S, N, SCALARS[-1]))
    w = torch.arange(1.0, 1 + T.numel(), dtype=T.dtype).view_as(T)
    grads = torch.autograd.grad((T * w).sum(), flat)
    # at world size 1 the rows held are the whole layer: the gradients are the grouped op's own
    ref = agl_terms_grouped(*(flat[k::4] for k in range(4)), fishers=[F for _, F, _ in layers],
                            scales=[s for *_, s in layers], beta=SCALARS[0], tau=SCALARS[1], sharpness=SCALARS[2],
                            eps=SCALARS[3], backend="kernel")
    for g, r in zip(grads, torch.autograd.grad((ref * w).sum(), flat)):
        assert torch.equal(g, r)
