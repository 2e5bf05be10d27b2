"""A user's way to the aligned start: ``agl.models.save_plain`` (a GGUF-loaded model saved once as a plain HF
directory) and ``export_aligned_start`` / ``agl align-start`` (the pipeline's cached stage, merged and saved)."""
from __future__ import annotations

import json
import os
import sys
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_experiment import tiny_config, tiny_factory  # noqa: E402  (the pipeline's tiny model and config)

from agl.models import load_causal_lm, save_plain  # noqa: E402


def _logits(model, ids=(5, 9, 17, 3, 40)):
    with torch.no_grad():
        return model(input_ids=torch.tensor([list(ids)])).logits


def _like_gguf(tie: bool = True):
    """A tiny Llama marked the way transformers marks a model it dequantised from a .gguf file."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                         tie_word_embeddings=tie))
    model.hf_quantizer = SimpleNamespace(quantization_config=SimpleNamespace(quant_method="gguf"))
    model.config.quantization_config = {"quant_method": "gguf"}
    return model.eval()


def test_save_plain_writes_a_gguf_loaded_model_as_a_plain_directory(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _like_gguf()
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "refused")  # what a user hits without save_plain
    assert save_plain(model, tmp_path / "plain") == str(tmp_path / "plain")
    cfg = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert "quantization_config" not in cfg
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    assert getattr(back, "hf_quantizer", None) is None
    assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()  # still tied
    torch.testing.assert_close(_logits(back), _logits(model), rtol=0, atol=0)
    assert [p.name for p in tmp_path.iterdir()] != [] and not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_save_plain_refuses_peft_models_and_non_empty_directories(tmp_path):
    from peft import LoraConfig, get_peft_model

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not an empty directory"):
        save_plain(_like_gguf(), tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    peft_model = get_peft_model(_like_gguf(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"merge the adapter first"):
        save_plain(peft_model, tmp_path / "p")
    (tmp_path / "empty").mkdir()
    save_plain(_like_gguf(tie=False), tmp_path / "empty")  # an empty directory is fine
    assert (tmp_path / "empty" / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from agl.experiment.export import export_aligned_start

    root = tmp_path_factory.mktemp("export")
    cfg = tiny_config(root / "cache", align_steps=10)
    res = export_aligned_start(root / "aligned", cfg, model_factory=tiny_factory, progress=False)
    return root, cfg, res


def test_export_is_the_merged_aligned_start(exported):
    from agl.experiment.align_start import load_aligned_model

    root, cfg, res = exported
    assert res["built"] and res["exported"] and res["out"] == str(root / "aligned")
    out = root / "aligned"
    for f in ("config.json", "model.safetensors", "tokenizer.json", "refusal_demos.jsonl", "holdout.jsonl",
              "aligned_start.json"):
        assert (out / f).is_file(), f
    marker = json.loads((out / "aligned_start.json").read_text())
    assert marker["hash"] == res["hash"] and marker["fields"]["align_steps"] == 10
    demos = [json.loads(l) for l in (out / "refusal_demos.jsonl").read_text().splitlines()]
    assert demos and all(isinstance(d["prompt"], str) and isinstance(d["response"], str) for d in demos)

    model, tok = load_causal_lm(out)  # a plain model directory: no peft, no pipeline
    assert not hasattr(model, "peft_config") and tok.chat_template
    base, _ = tiny_factory("tiny", "cpu", torch.float32)
    want = load_aligned_model(base, res["stage"], "cpu")  # the pipeline's own merge of the cached adapter
    torch.testing.assert_close(_logits(model), _logits(want), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_logits(model), _logits(base), atol=1e-3)  # the SFT is in the weights


def test_export_reuses_the_stage_and_the_export(exported, tmp_path):
    from agl.experiment.export import export_aligned_start
    from agl.experiment.plan import stage_plan

    root, cfg, res = exported
    assert stage_plan(cfg)["aligned_start"].status() is None  # what `agl experiment`/`agl demo` will reuse

    def no_model(*a):
        raise AssertionError("the model must not be loaded")

    again = export_aligned_start(root / "aligned", cfg, model_factory=no_model, progress=False)
    assert not again["built"] and not again["exported"]
    other = export_aligned_start(tmp_path / "second", cfg, model_factory=tiny_factory, progress=False)
    assert not other["built"] and other["exported"] and other["hash"] == res["hash"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="neither empty nor an exported aligned start"):
        export_aligned_start(tmp_path / "mine", cfg, model_factory=tiny_factory, progress=False)


def test_align_start_command(exported, tmp_path, monkeypatch, capsys):
    """`agl align-start --config ... --out DIR` on the cached stage; a second run says it is already there."""
    import agl.experiment._common as common
    from agl.cli import main

    root, cfg, _ = exported
    monkeypatch.setattr(common, "default_model_factory", tiny_factory)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    argv = ["align-start", "--config", str(tmp_path / "cfg.json"), "--no-progress", "--out", str(tmp_path / "a")]
    assert main(argv) == 0
    assert "reused from" in capsys.readouterr().out and (tmp_path / "a" / "model.safetensors").is_file()
    assert main(argv) == 0
    assert "already holds this aligned start" in capsys.readouterr().out
    (tmp_path / "b").write_text("a file")
    assert main(argv[:-2] + ["--out", str(tmp_path / "b")]) == 2
    assert "agl align-start: error: export_aligned_start: `out`" in capsys.readouterr().err
