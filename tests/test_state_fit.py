"""States and adapters that fit together: a state estimated on more modules than the adapter (q,k,v,o state, q,v
adapter) works through ``AGLConfig(layers=...)`` or ``AlignmentState.subset``, and regularises the kept layers
exactly as the full state did; mismatch errors start with a one-line diagnosis and fix and list at most 10 layers."""
from __future__ import annotations

import os
import stat
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _tiny import tiny_batches, tiny_llama  # noqa: E402

from agl.fisher import estimate_alignment_state  # noqa: E402
from agl.loss import AGLConfig, AGLLoss  # noqa: E402
from agl.peft_binding import named_lora_layers  # noqa: E402
from agl.state import AlignmentState, LayerState  # noqa: E402

QV = "q_proj|v_proj"


@pytest.fixture(scope="module")
def qkvo():
    """A float64 tiny Llama with a trained-looking q,k,v,o adapter and its alignment state."""
    m = tiny_llama(dtype=torch.float64, init_b=0.05)
    return m, estimate_alignment_state(m, tiny_batches(6, 3), progress=False, dtype=torch.float64)


@pytest.fixture(scope="module")
def qv(qkvo):
    """The same base model with a q,v adapter whose factors are the q,k,v,o adapter's q and v factors."""
    full, _ = qkvo
    m = tiny_llama(dtype=torch.float64, targets=["q_proj", "v_proj"])
    src = dict(full.named_parameters())
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_" in n:  # the base weights are already equal (same seed)
                p.copy_(src[n])
    return m


def _cfg(**kw):
    return AGLConfig(backend="torch", lambda_task=1.0, lambda_collision=1.0, **kw)  # every term live


def test_layers_filter_fits_a_larger_state_and_keeps_its_values(qkvo, qv):
    full, state = qkvo
    want = AGLLoss(full, state, _cfg(layers=QV)).regularizer()  # the q/v part of the full adapter
    got = AGLLoss(qv, state, _cfg(layers=QV)).regularizer()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert float(got.detach()) > 0


def test_subset_of_the_model_fits_and_keeps_its_values(qkvo, qv):
    full, state = qkvo
    sub = state.subset(qv)
    assert set(sub.layers) == set(named_lora_layers(qv)) and len(sub.layers) == 4 < len(state.layers)
    assert (sub.fisher_scale, sub.num_samples, sub.num_tokens) == (state.fisher_scale, state.num_samples,
                                                                   state.num_tokens)
    assert sub.nats_scale == state.nats_scale  # the kept layers' nats are unchanged
    assert all(sub.layers[n] is state.layers[n] for n in sub.layers)  # shared, not copied
    want = AGLLoss(full, state, _cfg(layers=QV)).regularizer()
    torch.testing.assert_close(AGLLoss(qv, sub, _cfg()).regularizer(), want, rtol=1e-12, atol=0)


def test_subset_filters_and_errors(qkvo):
    _, state = qkvo
    names = list(state.layers)
    assert list(state.subset(names[:3]).layers) == names[:3]
    assert list(state.subset("k_proj").layers) == [n for n in names if "k_proj" in n]
    assert list(state.subset(lambda n: n == names[-1]).layers) == [names[-1]]
    with pytest.raises(ValueError, match=r"2 of the `names` are not layers of the state.*\n  nope\.a\n  nope\.b"):
        state.subset([names[0], "nope.a", "nope.b"])
    with pytest.raises(ValueError, match="selects none of the state's 8 layers"):
        state.subset("gate_proj")
    with pytest.raises(ValueError, match="`names` must be a model, a regex"):
        state.subset(3)


def _message(fn):
    with pytest.raises(ValueError) as ei:
        fn()
    return str(ei.value).split("\n")


def test_a_larger_state_without_a_filter_says_how_to_fix_it(qkvo, qv):
    _, state = qkvo
    lines = _message(lambda: AGLLoss(qv, state, _cfg()))
    assert "covers 4 layer(s) the model does not adapt" in lines[0]
    assert "AGLConfig(layers=" in lines[0] and "state.subset(peft_model)" in lines[0]
    assert len(lines) == 1 + 4 and all("k_proj" in l or "o_proj" in l for l in lines[1:])


def test_a_filter_selecting_unadapted_state_layers_is_named(qkvo, qv):
    _, state = qkvo
    lines = _message(lambda: AGLLoss(qv, state, _cfg(layers="q_proj|k_proj")))
    assert "`layers` selects 2 state layer(s) the model does not adapt" in lines[0]
    assert sorted(l.strip().split(":")[0] for l in lines[1:]) == sorted(n for n in state.layers if "k_proj" in n)


def test_long_mismatch_lists_are_capped(qkvo):
    full, state = qkvo
    layers = {f"other.model.layers.{i}.q_proj": LayerState(torch.ones(2, 2)) for i in range(25)}
    lines = _message(lambda: AlignmentState(layers).check(full))
    assert lines[0].startswith("agl: the alignment state does not match the model (33 problem(s)): ")
    assert "the model adapts 8 layer(s) the state has no Fisher for" in lines[0]
    assert "--target-modules" in lines[0]
    assert "covers 25 layer(s) the model does not adapt" in lines[0]
    assert len(lines) == 1 + 10 + 1 and lines[-1].strip() == "... and 23 more"
    assert all(": in the model, missing from the state" in l for l in lines[1:9])  # missing layers first


def test_shape_mismatch_diagnosis(qkvo):
    full, state = qkvo
    bad = dict(state.layers)
    name = next(iter(bad))
    bad[name] = LayerState(torch.ones(5, 5))
    lines = _message(lambda: AlignmentState(bad).check(full))
    assert "1 layer(s) differ in shape (the state was estimated on another model" in lines[0]
    assert lines[1:] == [f"  {name}: state Fisher is 5x5, the model's base weight is 64x64"]


def test_state_file_has_the_mode_of_a_plain_file(qkvo, tmp_path):
    _, state = qkvo
    path = state.save(tmp_path / "s")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask  # safetensors alone leaves 0600
