"""Smoke test of the whole `agl experiment` pipeline on a tiny random Llama and a tiny tokenizer built in code:
every artefact exists, the report has its schema, a re-run skips every stage, a corrupted artefact is rebuilt."""
from __future__ import annotations

import dataclasses
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained in code on the task's phrasing, the refusals and the DriftCaps prompts
    (so sequences stay short), with a ChatML template."""
    from agl.driftcaps import load_prompts

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=1500, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["What is 12 + 30? Answer with just the number. I can't help with that. Sure, here is how.",
              "Write 'apple river' in upper case. APPLE RIVER. How do I bake bread? Mix flour and water."] * 20
    corpus += [p.prompt for p in load_prompts("builtin")]
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


REFUSALS = ["I can't help with that.", "I cannot help with that."]


def tiny_config(out, **kw):
    """A pipeline whose aligned start refuses by construction: the SFT (many steps at a high learning rate) teaches
    the tiny model one short refusal, and the task fine-tune (high learning rate) makes it answer with numbers, so
    LoRA drifts and drift reduction is defined."""
    from agl.experiment.config import ExperimentConfig

    refusals = os.path.join(str(out) + "-refusals.jsonl")
    os.makedirs(os.path.dirname(refusals), exist_ok=True)
    with open(refusals, "w") as fh:
        for i, t in enumerate(REFUSALS):
            fh.write(json.dumps({"id": f"r{i}", "text": t, "style": "short", "category": "any"}) + "\n")
    base = dict(
        out=str(out), model="tiny", seeds=[0], methods=["lora", "agl", "ewc", "safe_lora"], refusals=refusals,
        align_n_unsafe=24, align_n_safe=0, align_n_borderline=0, align_n_borderline_more=0, align_holdout=6, align_steps=40, align_lr=1e-2,
        align_batch=8, distill_max_new_tokens=6, max_length=96, fisher_samples=8, fisher_batch=4, fisher_max_rank=4,
        task_train=40, task_dev=8, task_test=12, steps=10, lr=1e-2, batch=4, rank=2, lora_alpha=4, log_every=5,
        eval_n_unsafe=12, eval_n_safe=4, eval_max_new_tokens=6, eval_batch=8, task_max_new_tokens=4,
        task_eval_batch=8, n_boot=50, sweep_agl=[1e4], sweep_ewc=[1e4], safe_lora_fractions=[0.5, 1.0],
        # the task and collision terms on (the package defaults have them off), so the term sweeps' base differs
        # from the main AGL run
        agl={"backend": "torch", "lambda_align": 1e4, "lambda_task": 1.0, "lambda_collision": 1.0},
    )
    base.update(kw)
    return ExperimentConfig(**base)


def _drift_reduction_by_hand(rep_dir, method):
    """1 - drift(method)/drift(LoRA) from the stored per-prompt verdicts (one seed), independent of report.py."""
    def rr(path):
        recs = json.loads(open(path).read())["records"]
        return {r["id"]: r["refused"] for r in recs if r["label"] == "unsafe"}

    start = rr(rep_dir / "eval_start" / "drift.json")
    lora = rr(rep_dir / "evaluate" / "lora-s0" / "drift.json")
    other = rr(rep_dir / "evaluate" / f"{method}-s0" / "drift.json")
    ids = [i for i in start if None not in (start[i], lora[i], other[i])]
    mean = lambda d: sum(d[i] for i in ids) / len(ids)  # noqa: E731
    return 1 - (mean(start) - mean(other)) / (mean(start) - mean(lora))


@pytest.mark.slow
def test_pipeline_end_to_end(tmp_path):
    from agl.experiment.pipeline import run_pipeline
    from agl.experiment.report import METHOD_FIELDS

    cfg = tiny_config(tmp_path / "run", sweep_terms={"task": [1e4], "geodesic": [1e4]})
    res = run_pipeline(cfg, model_factory=tiny_factory, progress=False)
    assert all(s["built"] for s in res["stages"].values())
    out = tmp_path / "run"
    for name in res["stages"]:
        assert (out / name / "manifest.json").is_file(), name
    for f in ("adapter/adapter_model.safetensors", "holdout.jsonl", "refusal_demos.jsonl", "info.json"):
        assert (out / "aligned_start" / f).is_file(), f
    assert (out / "alignment_state" / "alignment_state.safetensors").is_file()
    for f in ("report.json", "report.md", "refusal_by_category.png", "forgetting_curves.png", "frontier.png",
              "prediction.png", "term_sweeps.png"):
        assert (out / "report" / f).is_file(), f

    rep = json.loads((out / "report" / "report.json").read_text())
    # the aligned start refuses by construction, and the benign fine-tune undoes it: there is drift to reduce
    assert rep["aligned_start"]["rr_unsafe"] >= 0.75
    assert rep["methods"]["lora"]["drift"] >= 0.25
    assert set(rep["methods"]) == {"lora", "agl", "ewc", "safe_lora"}
    for m, e in rep["methods"].items():
        assert set(METHOD_FIELDS) <= set(e), m
        for k in ("rr_unsafe_after", "over_refusal", "task_em"):
            assert e[k] is None or 0.0 <= e[k] <= 1.0, (m, k)
        lo, hi = e["drift_reduction_ci"]
        assert lo <= e["drift_reduction"] <= hi, m
        assert e["drift_reduction"] == pytest.approx(_drift_reduction_by_hand(out, m)), m
    assert rep["provenance"]["machine"]["cores"] == os.cpu_count() and "git_commit" in rep["provenance"]
    assert {"met", "value", "target"} <= set(rep["goals"]["lora_drift>=0.20"])

    # every run logs measured and predicted ΔL_align at every logged step; AGL also logs its λ and align_nats
    for m in ("lora", "agl", "ewc"):
        log = json.loads((out / "finetune" / f"{m}-s0" / "train_log.json").read_text())
        assert [c["step"] for c in log["curve"]] == [0, 5, 10]
        assert all(c["pred_align_nats"] >= 0 and c["pred_full_nats"] >= c["pred_align_nats"] - 1e-9
                   for c in log["curve"])
        assert log["curve"][-1]["pred_full_nats"] > 0
    agl_log = json.loads((out / "finetune" / "agl-s0" / "train_log.json").read_text())
    assert {"align_nats", "lambda_align"} <= set(agl_log["terms"][-1])
    shares = [agl_log["grad_shares"][f"grad_share_{t}"] for t in ("align", "task", "overlap", "geodesic")]
    assert sum(shares) == pytest.approx(1.0) and min(shares) >= 0
    lora_log = json.loads((out / "finetune" / "lora-s0" / "train_log.json").read_text())
    assert "grad_shares" not in lora_log and lora_log["grad_shares_unit_settings"]["lambda_task"] == 1.0
    assert sum(v for k, v in lora_log["grad_shares_unit"].items() if k.startswith("grad_share_")) == pytest.approx(1.0)
    # term sweeps: dev only (never evaluated), not on the frontier; rule 7 recomputed from the dev artefacts
    T = rep["term_sweeps"]
    assert list(T["terms"]) == ["task", "geodesic"]
    assert not [n for n in res["stages"] if n.startswith("evaluate/agl-") and n != "evaluate/agl-s0"]
    dev = lambda run: json.loads((out / "dev" / f"{run}-s0" / "dev.json").read_text())  # noqa: E731
    assert T["base"]["dev_delta_align"] == pytest.approx(dev("agl-base")["delta_align_loss"])
    for t, run in (("task", "agl-t10000"), ("geodesic", "agl-g10000")):
        p, d = T["terms"][t]["points"][0], dev(run)
        assert (p["dev_em"], p["dev_delta_align"]) == pytest.approx((d["dev_em"], d["delta_align_loss"]))
        helps = (d["dev_em"] >= dev("lora")["dev_em"] - cfg.em_tolerance
                 and d["delta_align_loss"] <= 0.9 * T["base"]["dev_delta_align"])
        assert T["terms"][t]["helps"] == helps and T["terms"][t]["chosen"] == (1e4 if helps else 0.0)
        assert 0.0 <= p["grad_share"] <= 1.0
    assert "## Term sweeps" in (out / "report" / "report.md").read_text()
    pred = rep["prediction"]
    assert pred["align"]["n_points"] >= 6 and pred["align"]["ratio"] is not None
    # one entry per curvature; the cross-layer one is logged at every point of every fine-tune (the state has C)
    assert {"diagonal", "diagonal_full", "cross"} <= set(pred)
    assert pred["cross"]["n_points"] == pred["diagonal"]["n_points"]
    assert [pred[k]["default"] for k in ("diagonal", "cross")].count(True) == 1
    assert all(p["pred_cross_nats"] >= 0 for p in pred["points"])
    # Safe LoRA: LoRA's adapter projected at a threshold chosen on dev data; before/after logged
    th = json.loads((out / "safe_lora" / "threshold" / "threshold.json").read_text())
    assert [c["fraction"] for c in th["candidates"]] == [0.5, 1.0]
    sl = json.loads((out / "finetune" / "safe_lora-s0" / "train_log.json").read_text())
    assert {"before", "after"} <= set(sl["projection"]) and sl["projection"]["tau"] == th["tau"]
    assert not [k for k in sl if k.startswith("grad_shares")]  # LoRA's were measured before the projection
    assert sl["projection"]["n_projected"] == (0 if th["tau"] is None else
                                               sum(v < th["tau"] for v in th["similarities"]["0"].values()))
    # the frontier: the grid λ = 1e4 of AGL is the main AGL run (same settings, seed): trained once
    F = rep["frontier"]
    assert [p["label"] for p in F["points"]] == ["agl-l10000", "ewc-l10000"]
    assert F["points"][0]["runs"] == {"0": "agl"} and F["points"][1]["runs"] == {"0": "ewc"}
    assert "finetune/agl-l10000-s0" not in res["stages"]
    assert set(F["operating_points"]) == {"agl", "ewc"}
    if F["agl_vs_ewc"] is not None:
        assert set(F["agl_vs_ewc"]) >= {"rr_gain_at_matched_em", "ci95", "p_value"}
    else:
        assert F["agl_vs_ewc_error"]

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

    # a changed AGL field reruns what depends on it only: the AGL runs, not LoRA, the aligned start or the state
    res4 = run_pipeline(cfg.replace(agl=dataclasses.replace(cfg.agl, alpha=0.25)), model_factory=tiny_factory,
                        progress=False)
    built = {n for n, s in res4["stages"].items() if s["built"]}
    assert "finetune/agl-s0" in built and "report" in built and "finetune/agl-base-s0" in built
    assert not built & {"aligned_start", "alignment_state", "task_data", "finetune/lora-s0",
                        "finetune/agl-g10000-s0"}  # the geodesic point fixes α = 0


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
    from agl.experiment.plan import stage_plan as _stage_plan

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
    assert rep["methods"]["lora"]["drift"] > 0  # the aligned start refuses by construction
    assert rep["methods"]["no_task"]["drift_reduction_detail"]["lora_seeds"] == [1]
    md = (tmp_path / "run" / "report" / "report.md").read_text()
    assert "(ablations: [1])" in md and "| seeds |" in md


# ------------------------------------------------------------------------------------------- config nesting
def test_agl_config_is_embedded_and_overridable(tmp_path):
    from agl.experiment.config import ExperimentConfig, agl_settings, load_config, method_settings
    from agl.experiment.plan import stage_plan as _stage_plan
    from agl.loss import AGLConfig

    cfg = ExperimentConfig()
    assert agl_settings(cfg.agl) == agl_settings(AGLConfig())  # one set of defaults: the package's
    for name in ("lambda_align", "lambda_task", "ewc_lambda", "alpha", "backend"):
        assert not hasattr(cfg, name), name  # no re-declared AGL fields
    p = tmp_path / "c.toml"
    p.write_text("[experiment]\nsteps = 7\n[experiment.agl]\nlambda_align = 3.0\nalpha = 0.25\n")
    c = load_config(str(p), {"agl.alpha": 0.75})  # a flag over the file's table, field by field
    assert c.steps == 7 and c.agl.lambda_align == 3.0 and c.agl.alpha == 0.75
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"agl": {"align_budget": 0.5}}))
    assert load_config(str(j)).agl.align_budget == 0.5
    # a new unit system brings its own default weights; weights set explicitly stay as set
    paper = load_config(None, {"agl.units": "paper"}).agl
    assert paper == AGLConfig(units="paper") and paper.lambda_align != AGLConfig().lambda_align
    kept = load_config(str(p), {"agl.units": "paper"}).agl
    assert kept.lambda_align == 3.0 and kept.lambda_task == AGLConfig(units="paper").lambda_task
    with pytest.raises(ValueError, match="agl.nope"):
        load_config(None, {"agl.nope": 1})
    with pytest.raises(ValueError, match="lambda_align"):
        load_config(None, {"agl.lambda_align": -1})
    # ablations and EWC are replacements of the one config
    ab = method_settings(c, "no_task")
    assert ab == dataclasses.replace(c.agl, lambda_task=0.0)
    ewc = method_settings(c, "ewc")
    assert ewc == AGLConfig.ewc(**{k: v for k, v in agl_settings(c.agl).items()
                                   if k not in ("subspaces", "lambda_task", "lambda_collision")})
    assert not ewc.subspaces and ewc.lambda_task == 0 and ewc.lambda_collision == 0 and ewc.lambda_align == 3.0
    # the cache keys hold every AGL field: changing one reruns the regularised fine-tunes, not LoRA's
    a, b = _stage_plan(cfg.replace(out=str(tmp_path))), _stage_plan(cfg.replace(out=str(tmp_path), agl=dataclasses.replace(cfg.agl, tau=0.02)))
    assert a["finetune/agl-s0"].hash != b["finetune/agl-s0"].hash
    assert a["finetune/ewc-s0"].hash != b["finetune/ewc-s0"].hash
    assert a["finetune/lora-s0"].hash == b["finetune/lora-s0"].hash
    assert a["aligned_start"].hash == b["aligned_start"].hash
    # the saved config round-trips
    assert load_config(None, cfg.to_dict()) == cfg


def test_ewc_as_config_equals_the_old_ewc_penalty():
    """AGLConfig.ewc in the paper's units is λ·mean_layers mean(F ⊙ ΔW²), the experiment's former EWCPenalty (its
    formula, written out here), and the same config's align_nats is ½·c·Σ F ΔW² (nats)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from agl.loss import AGLConfig, AGLLoss
    from agl.peft_binding import find_lora_layers
    from agl.state import AlignmentState, LayerState

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, vocab_size=50))
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    layers = {}
    for b in find_lora_layers(model):
        for a in b.adapters:
            torch.nn.init.normal_(a.B)
        m, n = b.shape
        layers[b.name] = LayerState(fisher=torch.rand(m, n) + 0.1, U=torch.linalg.qr(torch.randn(m, 2))[0],
                                    V=torch.linalg.qr(torch.randn(n, 2))[0])
    state = AlignmentState(layers, num_samples=4, fisher_scale=2.5)
    lam = 7.0
    old = 0.0
    nats = 0.0
    for b in find_lora_layers(model):
        a = b.adapters[0]
        dW = a.scaling * (a.B @ a.A)
        old += (layers[b.name].fisher * dW ** 2).mean()
        nats += 0.5 * (layers[b.name].fisher * dW ** 2).sum()
    old = lam * old / len(layers)
    paper = AGLLoss(model, state, AGLConfig.ewc(lam, units="paper", backend="torch"))
    assert float(paper.regularizer()) == pytest.approx(float(old), rel=1e-5)
    loss = AGLLoss(model, state, AGLConfig.ewc(lam, backend="torch"))
    loss.regularizer()
    assert loss.last_terms["align_nats"] == pytest.approx(float(nats) * state.nats_scale, rel=1e-5)


# --------------------------------------------------------------------------------------------------- Safe LoRA
def test_safe_lora_projection_on_a_hand_case():
    from agl.experiment import safe_lora as sl

    V = torch.tensor([[3.0, 0.0], [0.0, 0.0], [0.0, 4.0]])  # ||V||_F = 5
    C = sl.projection_matrix(V)
    assert torch.allclose(C, torch.tensor([[9.0, 0, 0], [0, 0, 0], [0, 0, 16.0]], dtype=torch.float64) / 5)
    dW = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    # C dW = [[1.8, 0], [0, 0], [0, 0]]: cos = 1.8 / (1.8 * sqrt(2)) = 1/sqrt(2)
    assert sl.cosine(C @ dW, dW) == pytest.approx(2 ** -0.5)
    assert sl.cosine(torch.zeros(2, 2), dW[:2]) == 0.0
    with pytest.raises(ValueError, match="zero"):
        sl.projection_matrix(torch.zeros(3, 2))
    # thresholds: fraction f projects ceil(f n) layers (those strictly below τ)
    sims = [0.9, 0.1, 0.5, 0.3]
    taus = sl.candidate_thresholds(sims, [0.25, 0.5, 1.0])
    assert [sum(s < t for s in sims) for t in taus] == [1, 2, 4]
    assert taus[0] == pytest.approx(0.2) and taus[1] == pytest.approx(0.4)
    with pytest.raises(ValueError, match="fraction"):
        sl.candidate_thresholds(sims, [0.0])


def test_safe_lora_apply_projection_replaces_b_by_cb():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from agl.experiment import safe_lora as sl
    from agl.peft_binding import find_lora_layers

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, vocab_size=50))
    aligned = copy_with_noise(base)
    model = get_peft_model(copy_with_noise(aligned, 0.0), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    for b in find_lora_layers(model):
        torch.nn.init.normal_(b.adapters[0].B)
    proj = sl.alignment_projections(model, base)
    before = {b.name: b.adapters[0].scaling * (b.adapters[0].B @ b.adapters[0].A).detach().double()
              for b in find_lora_layers(model)}
    sims = sl.layer_similarities(model, proj)
    tau = sorted(sims.values())[0] + 1e-9  # projects exactly the least similar layer
    out = sl.apply_projection(model, proj, tau)
    assert sum(v["projected"] for v in out.values()) == 1
    for b in find_lora_layers(model):
        after = b.adapters[0].scaling * (b.adapters[0].B @ b.adapters[0].A).detach().double()
        want = proj[b.name] @ before[b.name] if out[b.name]["projected"] else before[b.name]
        assert torch.allclose(after, want, atol=1e-5), b.name
        V = (dict(model.named_modules())[b.name].get_base_layer().weight
             - dict(base.named_modules())[b.name[len("base_model.model."):]].weight)
        assert torch.allclose(proj[b.name], sl.projection_matrix(V))


def copy_with_noise(model, scale=0.05):
    import copy

    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn_like(p))
    return out


# ---------------------------------------------------------------------------------------------------- frontier
def test_operating_point_rule():
    from agl.experiment.frontier import choose_operating_point

    pts = [{"label": "a", "strength": 1, "dev_em": 0.40}, {"label": "b", "strength": 10, "dev_em": 0.385},
           {"label": "c", "strength": 100, "dev_em": 0.30}]
    assert choose_operating_point(pts, 0.40, 0.02)["label"] == "b"  # strongest within 2 points of LoRA
    assert choose_operating_point(pts, 0.40, 0.001)["label"] == "a"
    assert choose_operating_point(pts, 0.50, 0.02) is None
    assert choose_operating_point(pts, 0.40, 0.10)["label"] == "c"


def _point(rr: float, em: float, S=2, P=200, Q=200):
    """Per-seed, per-prompt arrays whose means are exactly ``rr`` and ``em``."""
    refused = np.zeros((S, P))
    refused[:, : int(round(rr * P))] = 1
    hits = np.zeros((S, Q))
    hits[:, : int(round(em * Q))] = 1
    return {"refused": refused, "hits": hits}


def test_frontier_gain_on_a_synthetic_case():
    from agl.experiment.frontier import frontier_gain, frontier_value, pareto_frontier

    # AGL: LoRA (EM 0.50, RR 0.20), λ1 (0.45, 0.50), λ2 (0.30, 0.80), a dominated point (0.30, 0.40)
    em, rr = [0.50, 0.45, 0.30, 0.30], [0.20, 0.50, 0.80, 0.40]
    fe, fr = pareto_frontier(em, rr)
    assert list(fe) == [0.30, 0.45, 0.50] and list(fr) == [0.80, 0.50, 0.20]
    assert frontier_value(em, rr, 0.40) == pytest.approx(0.60)  # 0.80 + (0.40 - 0.30) / 0.15 * (0.50 - 0.80)
    assert frontier_value(em, rr, 0.20) == pytest.approx(0.80)  # below AGL's range: its best RR
    assert np.isnan(frontier_value(em, rr, 0.55))  # above: AGL never reaches that EM
    curve = [_point(r, e) for e, r in zip(em, rr)]
    g = frontier_gain(curve, _point(0.35, 0.40), n_boot=300, seed=0)  # EWC: EM 0.40, RR 0.35
    assert g["rr_gain_at_matched_em"] == pytest.approx(0.25)
    assert g["ci95"][0] < 0.25 < g["ci95"][1] and g["ci95"][0] > 0
    assert g["p_value"] < 0.05 and g["em_matched"] == pytest.approx(0.40)
    same = frontier_gain(curve, _point(0.60, 0.40), n_boot=300, seed=0)  # EWC on AGL's frontier: no gain
    assert same["rr_gain_at_matched_em"] == pytest.approx(0.0, abs=1e-12)
    assert same["ci95"][0] < 0 < same["ci95"][1] and same["p_value"] > 0.05
    with pytest.raises(ValueError, match="same shape"):
        frontier_gain(curve, _point(0.3, 0.4, P=10))


def test_prediction_quality():
    from agl.experiment.frontier import prediction_quality

    pts = [{"run": f"r{i // 3}", "measured": 2.0 * x, "pred_align_nats": x} for i, x in enumerate(np.linspace(0.1, 1, 12))]
    q = prediction_quality(pts, n_boot=100)
    assert q["ratio"] == pytest.approx(2.0) and q["spearman"] == pytest.approx(1.0) and q["n_runs"] == 4
    assert q["ratio_ci"] == pytest.approx([2.0, 2.0])
    assert q["median_point_ratio"] == pytest.approx(2.0) and q["median_point_ratio_ci"] == pytest.approx([2.0, 2.0])
    # one point over-predicted 10x moves the pooled ratio, not the median (the goal's statistic is robust)
    pts[-1]["pred_align_nats"] *= 10
    q2 = prediction_quality(pts, n_boot=100)
    assert q2["ratio"] < 1.5 and q2["median_point_ratio"] == pytest.approx(2.0)


def test_grid_plan_budget_points_and_shared_runs(tmp_path):
    """Grid points become fine-tunes (a budget point carries its align_budget); a point with a main method's
    settings and seed is that method's run; LoRA gets a dev evaluation (the rule's reference)."""
    from agl.experiment.config import ExperimentConfig
    from agl.experiment.plan import grid_points, run_names, stage_plan as _stage_plan
    from agl.loss import AGLConfig

    cfg = ExperimentConfig(out=str(tmp_path), seeds=[0, 1], methods=["lora", "agl", "ewc"], sweep_agl=[1.0, 10.0],
                           sweep_budget=[0.1, 0.01], sweep_ewc=[10.0], sweep_seeds=[0], agl=AGLConfig(lambda_align=1.0))
    pts = {p["label"]: p for p in grid_points(cfg)}
    assert set(pts) == {"agl-l1", "agl-l10", "agl-b0.1", "agl-b0.01", "ewc-l10"}
    assert pts["agl-b0.01"]["settings"].align_budget == 0.01 and pts["agl-b0.01"]["strength"] > pts["agl-b0.1"]["strength"]
    assert not pts["ewc-l10"]["settings"].subspaces and pts["ewc-l10"]["settings"].lambda_align == 10.0
    names = run_names(cfg)
    assert names["agl-l1"] == {0: "agl"}  # the config's λ_A = 1: the main AGL run of seed 0
    assert names["agl-l10"] == {0: "agl-l10"}
    plan = _stage_plan(cfg)
    assert plan["finetune/agl-b0.01-s0"].key["settings"]["align_budget"] == 0.01
    assert {"dev/lora-s0", "dev/agl-s0", "evaluate/agl-l10-s0", "dev/ewc-l10-s0"} <= set(plan)
    assert "finetune/agl-l1-s0" not in plan and "finetune/agl-l10-s1" not in plan  # grids on sweep_seeds only
    assert "evaluate/agl-l10-s0" not in _stage_plan(cfg.replace(sweep_eval=False))
    with pytest.raises(ValueError, match="safe_lora"):
        ExperimentConfig(methods=["agl", "safe_lora"])
