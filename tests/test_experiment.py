"""Smoke test of the whole `agl experiment` pipeline on a tiny random Llama and a tiny tokenizer built in code:
every artefact exists, the report has its schema, a re-run skips every stage, a corrupted artefact is rebuilt."""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer():
    """A byte-level BPE tokenizer (vocab ~300) trained in code, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["What is 12 + 30? Answer with just the number. I can't help with that. Sure, here is how.",
              "Write 'apple river' in upper case. APPLE RIVER. How do I bake bread? Mix flour and water."] * 20
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_factory(spec, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    model = LlamaForCausalLM(cfg).to(dtype).to(device)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def tiny_config(out):
    from agl.experiment.config import ExperimentConfig

    return ExperimentConfig(
        out=str(out), model="tiny", seeds=[0], methods=["lora", "agl", "ewc"],
        align_n_unsafe=12, align_n_safe=6, align_holdout=6, align_steps=2, align_batch=4, distill_max_new_tokens=6,
        max_length=96, fisher_samples=8, fisher_batch=4, fisher_max_rank=4,
        task_train=40, task_dev=8, task_test=12, steps=4, batch=4, rank=2, lora_alpha=4, log_every=1,
        eval_n_unsafe=6, eval_n_safe=4, eval_max_new_tokens=6, eval_batch=8, task_max_new_tokens=4,
        task_eval_batch=8, n_boot=50, sweep_agl=[1e3], sweep_ewc=[1e3], backend="torch",
    )


def test_pipeline_end_to_end(tmp_path):
    from agl.experiment.pipeline import run_pipeline
    from agl.experiment.report import METHOD_FIELDS

    cfg = tiny_config(tmp_path / "run")
    res = run_pipeline(cfg, model_factory=tiny_factory, progress=False)
    assert all(s["built"] for s in res["stages"].values())
    out = tmp_path / "run"
    for name in res["stages"]:
        assert (out / name / "manifest.json").is_file(), name
    for f in ("adapter/adapter_model.safetensors", "holdout.jsonl", "refusal_demos.jsonl", "info.json"):
        assert (out / "aligned_start" / f).is_file(), f
    assert (out / "alignment_state" / "alignment_state.safetensors").is_file()
    for f in ("report.json", "report.md", "refusal_by_category.png", "forgetting_curves.png", "frontier.png"):
        assert (out / "report" / f).is_file(), f

    rep = json.loads((out / "report" / "report.json").read_text())
    assert set(rep["aligned_start"]) >= {"rr_unsafe", "over_refusal"}
    assert set(rep["methods"]) == {"lora", "agl", "ewc"}
    for m, e in rep["methods"].items():
        assert set(METHOD_FIELDS) <= set(e), m
        for k in ("rr_unsafe_after", "over_refusal", "task_em"):
            assert e[k] is None or 0.0 <= e[k] <= 1.0, (m, k)
        assert isinstance(e["drift_reduction_ci"], list) and len(e["drift_reduction_ci"]) == 2
    assert rep["methods"]["lora"]["drift_reduction"] == 0.0
    assert len(rep["sweep"]) == 3
    # the sweep's λ=0 point is the main LoRA run (same settings, seed 0): evaluated on dev, not trained again
    lora0 = json.loads((out / "sweep" / "lora-l0" / "sweep.json").read_text())
    lora_log = json.loads((out / "finetune" / "lora-s0" / "train_log.json").read_text())
    assert lora0["source"] == "finetune/lora-s0"
    assert lora0["delta_align_loss"] == lora_log["curve"][-1]["delta_align_loss"]
    assert json.loads((out / "sweep" / "agl-l1000" / "sweep.json").read_text())["source"] == "trained"
    log = json.loads((out / "finetune" / "agl-s0" / "train_log.json").read_text())
    assert [c["step"] for c in log["curve"]] == [0, 1, 2, 3, 4]
    assert log["terms"] and "align" in log["terms"][-1]
    ewc = json.loads((out / "finetune" / "ewc-s0" / "train_log.json").read_text())
    assert ewc["terms"][-1]["ewc"] > 0

    # a re-run builds nothing and never loads the model
    def no_model(*a, **k):
        raise AssertionError("the model was loaded although every stage is cached")

    res2 = run_pipeline(cfg, model_factory=no_model, progress=False)
    assert not any(s["built"] for s in res2["stages"].values())

    # a corrupted artefact is reported and rebuilt (only it: its rebuild reproduces the same content, so what
    # depends on it keeps its key)
    target = out / "evaluate" / "agl-s0" / "task.json"
    target.write_text(target.read_text()[:-20])
    msgs = []
    res3 = run_pipeline(cfg, model_factory=tiny_factory, progress=False, log=msgs.append)
    assert res3["stages"]["evaluate/agl-s0"]["built"]
    assert "corrupt" in res3["stages"]["evaluate/agl-s0"]["reason"]
    assert sum(s["built"] for s in res3["stages"].values()) == 1
    json.loads(target.read_text())

    # a changed config reruns what depends on it only
    res4 = run_pipeline(cfg.replace(steps=3), model_factory=tiny_factory, progress=False)
    built = {n for n, s in res4["stages"].items() if s["built"]}
    assert "aligned_start" not in built and "alignment_state" not in built and "task_data" not in built
    assert {"finetune/lora-s0", "finetune/agl-s0", "report"} <= built


def test_interrupted_stage_leaves_no_artefact(tmp_path):
    from agl.experiment.stages import Stage

    st = Stage(str(tmp_path), "x", {"a": 1})

    def boom(d):
        open(os.path.join(d, "f.txt"), "w").write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        st.run(boom)
    assert st.status() == "missing"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".x.tmp")]
    r = st.run(lambda d: open(os.path.join(d, "f.txt"), "w").write("ok"))
    assert r.built and st.status() is None
    assert not st.run(lambda d: None).built
    assert "config changed" in Stage(str(tmp_path), "x", {"a": 2}).status()


def test_config_file_and_hash(tmp_path):
    from agl.experiment.config import ExperimentConfig, load_config, stable_hash

    p = tmp_path / "c.toml"
    p.write_text("[experiment]\nsteps = 7\nseeds = [1, 2]\n")
    cfg = load_config(str(p), {"lr": 1e-3})
    assert cfg.steps == 7 and cfg.seeds == [1, 2] and cfg.lr == 1e-3
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"methods": ["lora", "ewc"]}))
    assert load_config(str(j)).methods == ["lora", "ewc"]
    with pytest.raises(ValueError, match="unknown config key"):
        load_config(None, {"nope": 1})
    with pytest.raises(ValueError, match="unknown method"):
        ExperimentConfig(methods=["lora", "magic"])
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})


def test_task_splits_and_scorer():
    from agl.experiment.tasks import make_task_splits, normalise_answer, score_exact_match

    s = make_task_splits(500, 100, 300, seed=7)
    qs = [set(r["prompt"] for r in s[k]) for k in ("train", "dev", "test")]
    assert len(qs[2]) == 300 and not (qs[0] & qs[2]) and not (qs[1] & qs[2]) and not (qs[0] & qs[1])
    assert make_task_splits(10, 10, 300, seed=7)["test"] == s["test"]  # test split independent of train size
    assert normalise_answer(" 42.\nextra") == "42"
    sc = score_exact_match(["42", "APPLE RIVER", "apple river"],
                           [{"kind": "add", "answer": "42"}, {"kind": "upper", "answer": "APPLE RIVER"},
                            {"kind": "upper", "answer": "APPLE RIVER"}])
    assert sc["em"] == pytest.approx(2 / 3)


def test_ablation_seeds_plan_and_order(tmp_path):
    """`ablation_seeds` runs the five ablations on fewer seeds; the main methods keep `seeds`; the report stage's
    key changes with it (so a different seed plan never reuses a stale report)."""
    from agl.experiment.config import ExperimentConfig
    from agl.experiment.pipeline import _stage_plan

    cfg = ExperimentConfig(out=str(tmp_path), seeds=[0, 1], ablation_seeds=[0], methods=["lora", "no_task", "ewc"])
    assert cfg.seeds_for("no_task") == [0] and cfg.seeds_for("lora") == [0, 1] and cfg.seeds_for("ewc") == [0, 1]
    plan = _stage_plan(cfg)
    runs = sorted(n for n in plan if n.startswith("finetune/"))
    assert runs == ["finetune/ewc-s0", "finetune/ewc-s1", "finetune/lora-s0", "finetune/lora-s1",
                    "finetune/no_task-s0"]
    same = _stage_plan(cfg.replace(ablation_seeds=None))
    assert "finetune/no_task-s1" in same
    assert same["report"].hash != plan["report"].hash
    assert same["finetune/no_task-s0"].hash == plan["finetune/no_task-s0"].hash  # runs are shared between plans
    with pytest.raises(ValueError, match="ablation_seeds"):
        ExperimentConfig(ablation_seeds=[])


def test_ablation_on_fewer_seeds_is_paired_with_lora_on_the_same_seeds(tmp_path):
    from agl.experiment.pipeline import run_pipeline

    cfg = tiny_config(tmp_path / "run").replace(methods=["lora", "no_task"], seeds=[0, 1], ablation_seeds=[1],
                                                sweep_agl=[], sweep_ewc=[])
    res = run_pipeline(cfg, model_factory=tiny_factory, progress=False)
    runs = sorted(n for n in res["stages"] if n.startswith("finetune/"))
    assert runs == ["finetune/lora-s0", "finetune/lora-s1", "finetune/no_task-s1"]
    rep = res["report"]
    assert rep["methods"]["lora"]["seeds"] == [0, 1] and rep["methods"]["no_task"]["seeds"] == [1]
    assert [p["seed"] for p in rep["methods"]["no_task"]["per_seed"]] == [1]
    detail = rep["methods"]["no_task"].get("drift_reduction_detail")
    if detail is not None:  # absent only when LoRA did not drift on this tiny model (a ValueError, recorded)
        assert detail["lora_seeds"] == [1]
    else:
        assert "drift_reduction_error" in rep["methods"]["no_task"]
    md = (tmp_path / "run" / "report" / "report.md").read_text()
    assert "(ablations: [1])" in md and "| seeds |" in md
