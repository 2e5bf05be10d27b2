"""Alignment Fisher: hooks vs a brute-force per-sample W0.grad loop, subspaces, persistence, mismatch errors."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _tiny import tiny_batches, tiny_llama  # noqa: E402

from agl.fisher import AlignmentState, LayerState, estimate_alignment_state  # noqa: E402


@pytest.fixture(scope="module")
def model64():
    return tiny_llama(dtype=torch.float64, init_b=0.02)


@pytest.fixture(scope="module")
def state64(model64):
    return estimate_alignment_state(model64, tiny_batches(7, 3), keep_moments=True, dtype=torch.float64, progress=False)


def _brute_force(model, batches, per_sample: bool = True):
    """Independent oracle: one backward per sample, per-sample W0.grad squared, normalised by hand. With
    ``per_sample=False``: the EWC mistake instead, one backward per *batch* (summed loss), the batch gradient
    squared."""
    from peft.tuners.lora import LoraLayer

    layers = {n: m.get_base_layer() for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    sums = {n: [0, 0, 0] for n in layers}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    for base in layers.values():
        base.weight.requires_grad_(True)
    model.eval()
    N = 0
    for b in batches:
        n_rows = b["input_ids"].shape[0]
        for rows in ([slice(i, i + 1) for i in range(n_rows)] if per_sample else [slice(0, n_rows)]):
            for base in layers.values():
                base.weight.grad = None
            logits = model(input_ids=b["input_ids"][rows], attention_mask=b["attention_mask"][rows]).logits
            lab = b["labels"][rows, 1:]
            lp = torch.log_softmax(logits[:, :-1], -1)
            keep = lab != -100
            loss = -lp[keep].gather(-1, lab[keep].unsqueeze(-1)).sum()  # summed token loss of the sample(s)
            loss.backward()
            for n, base in layers.items():
                G = base.weight.grad
                sums[n][0] = sums[n][0] + G * G
                sums[n][1] = sums[n][1] + G @ G.T
                sums[n][2] = sums[n][2] + G.T @ G
        N += n_rows
    for p, f in flags:
        p.requires_grad_(f)
        p.grad = None
    mean = sum(float(s[0].sum()) for s in sums.values()) / N / sum(s[0].numel() for s in sums.values())
    return {n: (s[0] / N / mean, s[1] / N, s[2] / N) for n, s in sums.items()}, N


def test_hooks_match_per_sample_loop(model64, state64):
    ref, N = _brute_force(model64, tiny_batches(7, 3))
    assert state64.num_samples == N == 7
    assert set(state64.layers) == set(ref)
    assert len(ref) == 8  # 2 blocks x q/k/v/o
    for name, (F, S_out, S_in) in ref.items():
        ls = state64.layers[name]
        torch.testing.assert_close(ls.fisher, F, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ls.S_out, S_out, rtol=1e-10, atol=1e-16)
        torch.testing.assert_close(ls.S_in, S_in, rtol=1e-10, atol=1e-16)
    allF = torch.cat([ls.fisher.flatten() for ls in state64.layers.values()])
    assert abs(float(allF.mean()) - 1.0) < 1e-12  # global normalisation


def test_both_moment_paths_agree(model64, state64, monkeypatch):
    import agl.fisher as fisher_mod

    monkeypatch.setattr(fisher_mod, "_MOMENTS_VIA_TOKENS", False)  # S from the per-sample G instead of token Grams
    direct = estimate_alignment_state(model64, tiny_batches(7, 3), keep_moments=True, dtype=torch.float64,
                                      progress=False, chunk_elems=64 * 64 * 2)  # also: chunks of 2 samples
    for n, ls in state64.layers.items():
        for a, b in ((direct.layers[n].fisher, ls.fisher), (direct.layers[n].S_out, ls.S_out), (direct.layers[n].S_in, ls.S_in)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-16)


def _assert_per_sample_fisher(state, per_sample, squared_batch):
    """The EWC-mistake guard: the estimate equals the per-sample (empirical) Fisher mean_i G_i^2 and not the
    square of the batch gradient (sum_i G_i)^2, on a case where the two differ by far more than the tolerance."""
    for name, ls in state.layers.items():
        F, M = per_sample[name][0], squared_batch[name][0]
        assert float((F - M).abs().sum() / F.abs().sum()) > 0.2, f"{name}: the case does not separate the estimators"
        torch.testing.assert_close(ls.fisher, F, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")


@pytest.fixture(scope="module")
def one_batch_references(model64):
    """Seven samples in one batch: the hooks see all seven at once, the setting where the mistake would happen."""
    batches = tiny_batches(7, 7)
    return batches, _brute_force(model64, batches)[0], _brute_force(model64, batches, per_sample=False)[0]


def test_fisher_is_per_sample_not_squared_batch_gradient(model64, one_batch_references):
    batches, per_sample, squared_batch = one_batch_references
    state = estimate_alignment_state(model64, batches, progress=False, dtype=torch.float64, subspaces=False)
    _assert_per_sample_fisher(state, per_sample, squared_batch)


def test_ewc_guard_fails_for_the_squared_batch_gradient(model64, one_batch_references, monkeypatch):
    """The guard can fail: with the accumulator patched to square the whole batch's gradient (the EWC mistake), the
    estimate matches the mistake's oracle and the guard rejects it."""
    import agl.fisher as fisher_mod

    def squared_batch_gradient(self, delta, X, fan_in_fan_out, chunk_elems):
        R, C = (X, delta) if fan_in_fan_out else (delta, X)
        G = torch.einsum("btm,btn->mn", R.to(self.compute_dtype), C.to(self.compute_dtype))  # sum_i G_i
        self.add(G.unsqueeze(0))

    monkeypatch.setattr(fisher_mod._Accumulator, "add_from_activations", squared_batch_gradient)
    batches, per_sample, squared_batch = one_batch_references
    wrong = estimate_alignment_state(model64, batches, progress=False, dtype=torch.float64, subspaces=False)
    for name, ls in wrong.layers.items():
        torch.testing.assert_close(ls.fisher, squared_batch[name][0], rtol=1e-10, atol=1e-12)
    with pytest.raises(AssertionError):
        _assert_per_sample_fisher(wrong, per_sample, squared_batch)


def test_subspaces_orthonormal_and_energy_rule(state64):
    for name, ls in state64.layers.items():
        for Q, S, cap in ((ls.U, ls.S_out, 64), (ls.V, ls.S_in, 64)):
            k = Q.shape[1]
            torch.testing.assert_close(Q.T @ Q, torch.eye(k, dtype=Q.dtype), atol=1e-10, rtol=0)
            w = torch.linalg.eigvalsh(S).flip(0).clamp_min(0)
            frac = torch.cumsum(w, 0) / w.sum()
            assert frac[k - 1] >= 0.9 - 1e-9 and (k == 1 or frac[k - 2] < 0.9)  # the fewest reaching 90 %
            # Q spans the top-k eigen-space: the Rayleigh quotients sum to the top-k eigenvalues
            torch.testing.assert_close(torch.trace(Q.T @ S @ Q), w[:k].sum(), rtol=1e-9, atol=1e-18)


def test_max_rank_caps(model64):
    st = estimate_alignment_state(model64, tiny_batches(4, 4), energy=1.0, max_rank=3, progress=False)
    assert all(ls.U.shape[1] == 3 and ls.V.shape[1] == 3 for ls in st.layers.values())


def test_true_fisher_deterministic_and_batch_invariant(model64):
    a = estimate_alignment_state(model64, tiny_batches(4, 4), fisher="true", seed=3, progress=False, dtype=torch.float64, subspaces=False)
    b = estimate_alignment_state(model64, tiny_batches(4, 2), fisher="true", seed=3, progress=False, dtype=torch.float64, subspaces=False)
    e = estimate_alignment_state(model64, tiny_batches(4, 4), progress=False, dtype=torch.float64, subspaces=False)
    for n in a.layers:
        torch.testing.assert_close(a.layers[n].fisher, b.layers[n].fisher, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(a.layers[n].fisher, e.layers[n].fisher)


def test_model_restored_and_no_base_grad(model64):
    model64.train()
    estimate_alignment_state(model64, tiny_batches(2, 2), progress=False, subspaces=False)
    assert model64.training
    for n, p in model64.named_parameters():
        assert p.grad is None
        assert p.requires_grad == ("lora_" in n)


def test_max_samples_and_bad_options(model64):
    st = estimate_alignment_state(model64, tiny_batches(7, 3), max_samples=4, progress=False, subspaces=False)
    assert st.num_samples == 4
    with pytest.raises(ValueError, match="fisher"):
        estimate_alignment_state(model64, [], fisher="exact")
    with pytest.raises(ValueError, match="energy"):
        estimate_alignment_state(model64, [], energy=0)
    with pytest.raises(ValueError, match="no samples"):
        estimate_alignment_state(model64, [], progress=False)
    with pytest.raises(ValueError, match="not LoRA layers or nn.Linear"):
        estimate_alignment_state(model64, [], modules=["nope"])
    b = tiny_batches(2, 2)[0]
    with pytest.raises(ValueError, match="zero"):
        estimate_alignment_state(model64, [{**b, "labels": torch.full_like(b["labels"], -100)}], progress=False)


def test_plain_linear_modules():
    m = tiny_llama(lora=False, dtype=torch.float64)
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.v_proj"]
    st = estimate_alignment_state(m, tiny_batches(3, 3), modules=names, progress=False)
    assert list(st.layers) == names and st.layers[names[0]].shape == (64, 128)


@pytest.mark.parametrize("fisher_dtype", [torch.float32, torch.bfloat16])
def test_save_load_bit_exact(tmp_path, state64, fisher_dtype):
    st = AlignmentState({n: LayerState(ls.fisher.float(), ls.U.float(), None if i % 3 == 0 else ls.V.float())
                         for i, (n, ls) in enumerate(state64.layers.items())}, state64.num_samples, state64.fisher_scale,
                        dict(state64.options))
    path = st.save(tmp_path / "state", fisher_dtype=fisher_dtype)
    assert os.path.basename(path) == "alignment_state.safetensors"
    back = AlignmentState.load(tmp_path / "state")
    assert list(back.layers) == list(st.layers)
    assert back.num_samples == st.num_samples and back.fisher_scale == st.fisher_scale
    assert back.options == st.options
    for n, ls in st.layers.items():
        b = back.layers[n]
        assert b.fisher.dtype == fisher_dtype and torch.equal(b.fisher, ls.fisher.to(fisher_dtype))
        assert torch.equal(b.U, ls.U)
        assert (b.V is None) == (ls.V is None) and (ls.V is None or torch.equal(b.V, ls.V))
    if fisher_dtype == torch.bfloat16:
        assert os.path.getsize(path) < os.path.getsize(st.save(tmp_path / "f32.safetensors"))


def test_load_rejects_foreign_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="no AGL header"):
        AlignmentState.load(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="no alignment state"):
        AlignmentState.load(tmp_path / "missing")
    (tmp_path / "pickle.safetensors").write_bytes(b"\x80\x04garbage")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        AlignmentState.load(tmp_path / "pickle.safetensors")


def test_interrupted_save_leaves_nothing(tmp_path, state64, monkeypatch):
    import safetensors.torch as st_mod

    real = st_mod.save_file

    def crash(tensors, filename, metadata=None):
        real({"partial": torch.zeros(3)}, filename)  # half-written output, then the process "dies"
        raise KeyboardInterrupt

    target = tmp_path / "state"
    state64.save(target)
    before = (target / "alignment_state.safetensors").read_bytes()
    monkeypatch.setattr(st_mod, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        state64.save(target)
    with pytest.raises(KeyboardInterrupt):
        state64.save(tmp_path / "fresh")
    assert (target / "alignment_state.safetensors").read_bytes() == before  # the old state is intact
    assert os.listdir(target) == ["alignment_state.safetensors"]
    assert not (tmp_path / "fresh" / "alignment_state.safetensors").exists()
    assert os.listdir(tmp_path / "fresh") == []


def test_check_lists_every_mismatch(model64, state64):
    state64.check(model64)  # matches
    names = list(state64.layers)
    bad = dict(state64.layers)
    del bad[names[0]]
    bad[names[1]] = LayerState(torch.ones(5, 5))
    bad[names[2]] = LayerState(bad[names[2]].fisher, torch.zeros(3, 2))
    bad["not.a.layer"] = LayerState(torch.ones(2, 2))
    with pytest.raises(ValueError) as ei:
        AlignmentState(bad).check(model64)
    msg = str(ei.value)
    assert "4 problem(s)" in msg
    for frag in (names[0], names[1], names[2], "not.a.layer", "missing from the state", "5x5", "U has 3 rows"):
        assert frag in msg
