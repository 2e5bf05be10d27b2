"""AGLLoss: value vs the reference terms, gradients, errors, HF Trainer integration, backends."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _tiny import tiny_batches, tiny_llama  # noqa: E402

from agl import reference  # noqa: E402
from agl.fisher import AlignmentState, LayerState, estimate_alignment_state  # noqa: E402
from agl.loss import AGLConfig, AGLLoss, resolve_backend  # noqa: E402


@pytest.fixture(scope="module")
def trained():
    """float64 tiny Llama with a non-zero ("trained") adapter and its alignment state."""
    m = tiny_llama(dtype=torch.float64, init_b=0.05)
    st = estimate_alignment_state(m, tiny_batches(6, 3), progress=False, dtype=torch.float64)
    return m, st


def _hand_sum(model, state, cfg, task_loss):
    from peft.tuners.lora import LoraLayer

    terms = []
    for name, mod in model.named_modules():
        if not isinstance(mod, LoraLayer):
            continue
        ls = state.layers[name]
        B, A, s = mod.lora_B["default"].weight, mod.lora_A["default"].weight, mod.scaling["default"]
        t = reference.agl_terms(B, A, ls.U @ ls.U.T @ B, A @ ls.V @ ls.V.T, fisher=ls.fisher, scale=s,
                                beta=cfg.beta, tau=cfg.tau, sharpness=cfg.sharpness, eps=cfg.eps)
        terms.append(torch.stack(list(t)))
    mean = torch.stack(terms).mean(0)
    reg = cfg.lambda_align * mean[0] + cfg.lambda_task * mean[1] + cfg.lambda_collision * (
        cfg.alpha * mean[2] + (1 - cfg.alpha) * mean[3])
    return task_loss + reg, mean.detach()


def test_value_equals_reference_sum(trained):
    model, st = trained
    cfg = AGLConfig(lambda_align=3.0, lambda_task=0.7, lambda_collision=1.9, alpha=0.3, backend="torch", per_layer_terms=True,
                    units="paper")
    L = AGLLoss(model, st, cfg)
    task = torch.tensor(1.25, dtype=torch.float64)
    got = L(task)
    want, mean = _hand_sum(model, st, cfg, task)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    lt = L.last_terms
    for i, k in enumerate(("align", "task", "overlap", "geodesic")):
        assert lt[k] == pytest.approx(float(mean[i]), rel=1e-6)
        assert lt[k] > 0  # every term non-zero on a trained adapter, the geodesic included
    assert lt["task_loss"] == 1.25 and lt["total"] == pytest.approx(float(want.detach()), rel=1e-6)
    assert len(lt["layers"]) == 8 and all(v["geodesic"] > 0 for v in lt["layers"].values())
    assert L.layer_terms().keys() == lt["layers"].keys()


def test_one_sided_subspaces(trained):
    model, st = trained
    one = AlignmentState({n: LayerState(ls.fisher, ls.U, None) for n, ls in st.layers.items()})
    L = AGLLoss(model, one, AGLConfig(backend="torch"))
    L.regularizer()
    from peft.tuners.lora import LoraLayer

    name, mod = next((n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer))
    B, A = mod.lora_B["default"].weight, mod.lora_A["default"].weight
    U = st.layers[name].U
    t = reference.agl_terms(B, A, U @ U.T @ B, A, fisher=st.layers[name].fisher, scale=mod.scaling["default"])
    got = AGLLoss(model, one, AGLConfig(backend="torch", layers=[name], units="paper"))
    got.regularizer()
    assert got.last_terms["align"] == pytest.approx(float(t.align.detach()), rel=1e-6)


def test_grads_reach_every_factor_from_zero_init():
    model = tiny_llama(dtype=torch.float32)  # peft default init: B = 0
    st = estimate_alignment_state(model, tiny_batches(3, 3), progress=False)
    L = AGLLoss(model, st, AGLConfig(backend="torch"))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n for n in params) and len(params) == 16
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    batch = tiny_batches(3, 3, seed=5)[0]
    loss = L(model(**batch).loss)
    assert L.last_terms["regularizer"] == 0.0  # B = 0: D = 0
    loss.backward()
    opt.step()
    opt.zero_grad()
    L.regularizer().backward()  # the regulariser alone, after one step
    for n, p in params.items():
        assert p.grad is not None and p.grad.abs().max() > 0, n
    assert all(L.last_terms[k] > 0 for k in ("align", "task", "overlap", "geodesic"))


def test_fan_in_fan_out_uses_weight_orientation():
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)).double()
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    st = estimate_alignment_state(model, tiny_batches(3, 3, vocab=64), progress=False, dtype=torch.float64)
    (name, ls), = st.layers.items()
    assert ls.shape == (32, 96)  # Conv1D weight: (in, out)
    mod = dict(model.named_modules())[name]
    # Fisher of a Conv1D layer equals the brute-force W0.grad loop (weight orientation)
    from agl.fisher import estimate_alignment_state_loop

    ref = estimate_alignment_state_loop(model, tiny_batches(3, 3, vocab=64), dtype=torch.float64)
    torch.testing.assert_close(ls.fisher, ref.layers[name].fisher, rtol=1e-10, atol=1e-12)
    L = AGLLoss(model, st, AGLConfig(backend="torch", units="paper"))
    L.regularizer()
    B, A = mod.lora_B["default"].weight, mod.lora_A["default"].weight
    DW = mod.get_delta_weight("default")  # peft's own ΔW, (in, out)
    t = reference.agl_terms(A.T, B.T, ls.U @ ls.U.T @ A.T, B.T @ ls.V @ ls.V.T, fisher=ls.fisher, scale=mod.scaling["default"])
    torch.testing.assert_close(mod.scaling["default"] * A.T @ B.T, DW)
    assert L.last_terms["align"] == pytest.approx(float(t.align.detach()), rel=1e-6)


def test_errors(trained, tmp_path):
    model, st = trained
    with pytest.raises(ValueError, match="no peft LoRA layers"):
        AGLLoss(tiny_llama(lora=False), st)
    bad = AlignmentState({k: v for i, (k, v) in enumerate(st.layers.items()) if i})
    with pytest.raises(ValueError, match="missing from the state"):
        AGLLoss(model, bad)
    m2 = tiny_llama(dtype=torch.float64)
    m2.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        AGLLoss(m2, st)
    with pytest.raises(ValueError, match="alpha"):
        AGLConfig(alpha=2)
    with pytest.raises(ValueError, match="lambda_align"):
        AGLConfig(lambda_align=-1)
    with pytest.raises(ValueError, match="backend"):
        AGLConfig(backend="cuda")
    with pytest.raises(ValueError, match="task_metric"):
        AGLConfig(task_metric="fisher")
    with pytest.raises(TypeError, match="AlignmentState"):
        AGLLoss(model, {"a": 1})
    with pytest.raises(ValueError, match="layer filter"):
        AGLLoss(model, st, AGLConfig(layers="nomatch$"))


def test_sharded_parameters_rejected(trained):
    """FSDP / ZeRO-3 are not supported: a partitioned LoRA factor (DeepSpeed marks it with ds_id) is a clear error."""
    model, st = trained
    m = tiny_llama(dtype=torch.float64)
    w = next(p for n, p in m.named_parameters() if "lora_A" in n)
    w.ds_id = 7
    with pytest.raises(NotImplementedError, match="ZeRO-3"):
        AGLLoss(m, st)


def test_task_metric_state_and_layer_filter(trained):
    model, st = trained
    H = AlignmentState({n: LayerState(torch.rand_like(ls.fisher)) for n, ls in st.layers.items()})
    a = AGLLoss(model, st, AGLConfig(backend="torch", task_metric=H, layers=r"q_proj"))
    assert len(a.entries) == 2
    a.regularizer()
    b = AGLLoss(model, st, AGLConfig(backend="torch", layers=r"q_proj"))
    b.regularizer()
    assert a.last_terms["task"] != b.last_terms["task"] and a.last_terms["align"] == b.last_terms["align"]


def test_trainer_loss_weighting(trained):
    model, st = trained
    L = AGLLoss(model, st, AGLConfig(backend="torch"))
    b = tiny_batches(3, 3)[0]
    with torch.no_grad():
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        plain = L.trainer_loss(out, b["labels"])
        ref = model(**b).loss + L.regularizer()
        n_local = int((b["labels"][:, 1:] != -100).sum())
        half = L.trainer_loss(out, b["labels"], num_items_in_batch=torch.tensor(2 * n_local))
    torch.testing.assert_close(plain, ref.to(plain.dtype), rtol=1e-6, atol=1e-9)
    # a micro-batch with half the counted tokens carries half the task loss sum and half the regulariser
    torch.testing.assert_close(half, plain / 2, rtol=1e-6, atol=1e-9)


def test_trainer_two_steps(tmp_path):
    pytest.importorskip("accelerate")
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    from agl.loss import AGLLoggingCallback

    model = tiny_llama()
    st = estimate_alignment_state(model, tiny_batches(3, 3), progress=False)
    L = AGLLoss(model, st, AGLConfig(backend="torch"))
    rows = [{k: v[i] for k, v in b.items()} for b in tiny_batches(8, 4, seed=2) for i in range(4)]

    class DS(Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return rows[i]

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, logging_steps=1,
                             report_to=[], save_strategy="no", use_cpu=True, learning_rate=1e-2,
                             gradient_accumulation_steps=2, disable_tqdm=True)
    tr = Trainer(model=model, args=args, train_dataset=DS(), compute_loss_func=L.trainer_loss,
                 callbacks=[AGLLoggingCallback(L)])
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    tr.train()
    assert tr.state.global_step == 2
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert len(logs) == 2 and all("agl/align" in h and "agl/geodesic" in h for h in logs)
    assert logs[-1]["agl/regularizer"] > 0  # B moved away from 0 after the first step
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


def _kernel_available():
    try:
        return resolve_backend("auto", torch.device("cpu")) == "kernel"
    except Exception:
        return False


@pytest.mark.skipif(not _kernel_available(), reason="agl's compiled kernel is not built")
def test_kernel_matches_torch_backend():
    model = tiny_llama(init_b=0.05)
    st = estimate_alignment_state(model, tiny_batches(3, 3), progress=False)
    vals, grads = {}, {}
    for backend in ("torch", "kernel"):
        L = AGLLoss(model, st, AGLConfig(backend=backend))
        model.zero_grad()
        r = L.regularizer()
        (3.0 * r).backward()
        vals[backend] = L.last_terms
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for k in ("align", "task", "overlap", "geodesic", "regularizer"):
        assert vals["kernel"][k] == pytest.approx(vals["torch"][k], rel=1e-4, abs=1e-9)
    for n, g in grads["torch"].items():
        torch.testing.assert_close(grads["kernel"][n], g, rtol=1e-3, atol=1e-7)
