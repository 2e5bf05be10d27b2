"""The experiment pipeline, stages 1-6, each cached and resumable (see ``agl.experiment.stages``).

Artefacts under ``cfg.out``::

    aligned_start/            stage 1: SFT adapter of the aligned start, its data, held-out refusal demos
    eval_start/               the aligned start on the DriftCaps eval prompts and the task test split
    alignment_state/          stage 2: agl.AlignmentState of the aligned start (task LoRA layout)
    task_data/                stage 3: the generated task (train/dev/test)
    finetune/<method>-s<seed>/    stage 3: LoRA adapter + training log (alignment-loss curve)
    evaluate/<method>-s<seed>/    stage 4: DriftCaps records + task exact-match
    sweep/<kind>-l<λ>/        optional λ sweep (calibration ΔL_align + task dev EM)
    report/                   stages 5-6: report.json, report.md, PNG plots
    work/                     resumable generation caches (safe to delete)

The model is loaded only when some stage has to be built, so a fully cached re-run takes seconds.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Callable, Dict, List, Optional

from agl.experiment.config import EVAL_VERSION, STAGE_FIELDS, ExperimentConfig, method_settings
from agl._io import atomic_write_json
from agl.experiment.stages import Stage, StageResult

__all__ = ["run_pipeline", "Context"]


def _fmt_lam(x: float) -> str:
    return f"{x:g}".replace("+", "")


class Context:
    """Lazily loaded models and artefacts shared by the stages of one run."""

    def __init__(self, cfg: ExperimentConfig, model_factory: Optional[Callable] = None, progress: bool = True,
                 log: Callable[[str], None] = None):
        from agl.experiment._common import default_model_factory

        self.cfg = cfg
        self.factory = model_factory or default_model_factory
        self.progress = progress
        self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        self._base = None
        self._tok = None
        self._aligned = None
        self.stages: Dict[str, Stage] = {}
        self.results: Dict[str, StageResult] = {}

    # -- models
    def base(self):
        if self._base is None:
            from agl.experiment._common import torch_dtype
            from agl.models import stop_at_end_of_turn

            t0 = time.time()
            if self.cfg.threads:
                import torch

                torch.set_num_threads(self.cfg.threads)
            self._base, self._tok = self._load_base(torch_dtype(self.cfg.dtype))
            if self._tok.pad_token is None:
                self._tok.pad_token = self._tok.eos_token
            stop_at_end_of_turn(self._base, self._tok)
            self.log(f"loaded {self.cfg.model} in {time.time() - t0:.0f}s")
        return self._base, self._tok

    def _load_base(self, dtype):
        """The factory's model; for the default factory and a non-directory spec (a GGUF: slow to convert), a
        converted copy is kept under ``out/work/`` and loaded from there next time."""
        from agl.experiment._common import default_model_factory
        from agl.experiment.config import stable_hash

        spec = self.cfg.model
        if self.factory is not default_model_factory or os.path.isdir(spec):
            return self.factory(spec, self.cfg.device, dtype)
        cache = os.path.join(self.cfg.out, "work", f"base-model-{stable_hash([spec, str(dtype)])}")
        if os.path.exists(os.path.join(cache, "complete")):
            try:
                return self.factory(cache, self.cfg.device, dtype)
            except Exception as exc:  # noqa: BLE001 - a broken cache is rebuilt
                self.log(f"cached copy of {spec} at {cache} is unusable ({exc.__class__.__name__}): reconverting")
        model, tok = self.factory(spec, self.cfg.device, dtype)
        import shutil

        tmp = cache + f".tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _save_plain(model, tmp)
            tok.save_pretrained(tmp)
            open(os.path.join(tmp, "complete"), "w").close()
            shutil.rmtree(cache, ignore_errors=True)
            os.replace(tmp, cache)
        except (OSError, ValueError, RuntimeError) as exc:  # caching is an optimisation only
            self.log(f"could not cache the converted model ({str(exc).splitlines()[0]})")
            shutil.rmtree(tmp, ignore_errors=True)
        return model, tok

    def aligned(self):
        if self._aligned is None:
            from agl.experiment.align_start import load_aligned_model

            base, _ = self.base()
            self._aligned = load_aligned_model(base, self.stages["aligned_start"].path, self.cfg.device)
        return self._aligned, self._tok

    def tuned(self, method: str, seed: int):
        """The aligned start with a fine-tune's adapter applied (not merged)."""
        import copy

        from peft import PeftModel

        aligned, tok = self.aligned()
        path = os.path.join(self.stages[f"finetune/{method}-s{seed}"].path, "adapter")
        model = PeftModel.from_pretrained(copy.deepcopy(aligned), path)
        model.to(self.cfg.device)
        model.eval()
        return model, tok

    def work(self, name: str, stage: Stage) -> str:
        d = os.path.join(self.cfg.out, "work", f"{name.replace('/', '_')}-{stage.hash}")
        os.makedirs(d, exist_ok=True)
        return d


def _save_plain(model, path: str) -> None:
    """``save_pretrained`` for a model loaded from GGUF (which transformers refuses to serialise): the dequantised
    weights as safetensors and the config without its quantisation entry."""
    os.makedirs(path, exist_ok=True)
    try:
        model.save_pretrained(path)
        return
    except ValueError:
        pass
    from safetensors.torch import save_model

    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(cfg, fh, indent=2)
    save_model(model, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(path)


def _read_json(path: str):
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _stage_plan(cfg: ExperimentConfig) -> Dict[str, Stage]:
    """Every stage with its cache key (its config fields + its upstream stages' hashes)."""
    S: Dict[str, Stage] = {}
    root = cfg.out

    def add(name, fields_of, upstream=(), extra=None):
        key = {"fields": cfg.key(STAGE_FIELDS[fields_of]) if fields_of else {},
               "upstream": {u: S[u].hash for u in upstream}, **(extra or {})}
        S[name] = Stage(root, name, key)

    add("task_data", "task_data")
    add("aligned_start", "aligned_start")
    add("eval_start", "eval_start", ["aligned_start", "task_data"],
        extra={"task_max_new_tokens": cfg.task_max_new_tokens, "eval_version": EVAL_VERSION})
    add("alignment_state", "alignment_state", ["aligned_start"])
    for m in cfg.methods:
        st = method_settings(cfg, m)
        up = ["aligned_start", "task_data"] + (["alignment_state"] if st["kind"] != "lora" else [])
        for s in cfg.seeds_for(m):
            add(f"finetune/{m}-s{s}", "finetune", up, extra={"settings": st, "seed": s})
            add(f"evaluate/{m}-s{s}", "evaluate", [f"finetune/{m}-s{s}", "task_data"],
                extra={"eval_version": EVAL_VERSION})
    for kind, lams in (("agl", cfg.sweep_agl), ("ewc", cfg.sweep_ewc)):
        for lam in lams:
            st = method_settings(cfg, kind, lam=lam)
            add(f"sweep/{kind}-l{_fmt_lam(lam)}", "finetune", ["aligned_start", "task_data", "alignment_state"],
                extra={"settings": st, "seed": cfg.sweep_seed, "task_max_new_tokens": cfg.task_max_new_tokens})
    if cfg.sweep_agl or cfg.sweep_ewc:
        add("sweep/lora-l0", "finetune", ["aligned_start", "task_data"],
            extra={"settings": method_settings(cfg, "lora"), "seed": cfg.sweep_seed,
                   "task_max_new_tokens": cfg.task_max_new_tokens})
    up = [n for n in S]
    add("report", None, up, extra={"n_boot": cfg.n_boot, "law_with_offset": cfg.law_with_offset,
                                   "methods": list(cfg.methods),
                                   "seeds": {m: cfg.seeds_for(m) for m in cfg.methods}})
    return S


# ----------------------------------------------------------------------------------------------- stage builders
def _build_aligned_start(ctx: Context, stage: Stage):
    from agl.experiment.align_start import train_aligned_start

    def build(tmp):
        base, tok = ctx.base()
        train_aligned_start(ctx.cfg, base, tok, tmp, ctx.work("aligned_start", stage), progress=ctx.progress)

    return build


def _task_records(ctx: Context, split: str) -> List[dict]:
    return _read_json(os.path.join(ctx.stages["task_data"].path, f"{split}.json"))


def _evaluate_into(ctx: Context, model, tok, work: str, tmp: str) -> None:
    """DriftCaps eval + task exact-match of one model, generations cached under ``work``, results into ``tmp``."""
    from agl.experiment.evaluation import drift_eval, select_eval_prompts, task_eval

    cfg = ctx.cfg
    drift = drift_eval(model, tok, select_eval_prompts(cfg), max_new_tokens=cfg.eval_max_new_tokens,
                       batch_size=cfg.eval_batch, cache=os.path.join(work, "drift.jsonl"), progress=ctx.progress)
    task = task_eval(model, tok, _task_records(ctx, "test"), max_new_tokens=cfg.task_max_new_tokens,
                     batch_size=cfg.task_eval_batch, device=cfg.device, cache=os.path.join(work, "task.jsonl"),
                     progress=ctx.progress)
    atomic_write_json(os.path.join(tmp, "drift.json"), drift)
    atomic_write_json(os.path.join(tmp, "task.json"), task)


def _build_eval_start(ctx: Context, stage: Stage):
    def build(tmp):
        model, tok = ctx.aligned()
        _evaluate_into(ctx, model, tok, ctx.work("eval_start", stage), tmp)

    return build


def _holdout(ctx: Context) -> List[dict]:
    from agl._io import read_jsonl

    return read_jsonl(os.path.join(ctx.stages["aligned_start"].path, "holdout.jsonl"))


def _build_alignment_state(ctx: Context, stage: Stage):
    def build(tmp):
        import copy

        import torch
        from peft import get_peft_model

        from agl._io import read_jsonl
        from agl.experiment._common import chat_batches, lora_config
        from agl.fisher import estimate_alignment_state

        cfg = ctx.cfg
        aligned, tok = ctx.aligned()
        torch.manual_seed(0)
        model = get_peft_model(copy.deepcopy(aligned), lora_config(cfg.rank, cfg.lora_alpha, list(cfg.targets)))
        model.to(cfg.device)
        demos = read_jsonl(os.path.join(ctx.stages["aligned_start"].path, "refusal_demos.jsonl"))
        batches = chat_batches(tok, demos[: cfg.fisher_samples], cfg.max_length, cfg.fisher_batch)
        state = estimate_alignment_state(model, batches, fisher=cfg.fisher_kind, max_samples=cfg.fisher_samples,
                                         energy=cfg.fisher_energy, max_rank=cfg.fisher_max_rank,
                                         progress=ctx.progress)
        state.save(tmp)
        ranks = {n: [None if l.U is None else int(l.U.shape[1]), None if l.V is None else int(l.V.shape[1])]
                 for n, l in state.layers.items()}
        atomic_write_json(os.path.join(tmp, "summary.json"), {"num_samples": state.num_samples, "ranks": ranks})

    return build


def _load_state(ctx: Context):
    from agl.state import AlignmentState

    return AlignmentState.load(ctx.stages["alignment_state"].path, device=ctx.cfg.device)


def _build_task_data(ctx: Context, stage: Stage):
    from agl.experiment.tasks import make_task_splits

    def build(tmp):
        cfg = ctx.cfg
        splits = make_task_splits(cfg.task_train, cfg.task_dev, cfg.task_test, seed=cfg.task_seed)
        for k, v in splits.items():
            atomic_write_json(os.path.join(tmp, f"{k}.json"), v)

    return build


def _train(ctx: Context, settings: dict, seed: int, desc: str):
    from agl.experiment.train import finetune

    cfg = ctx.cfg
    aligned, tok = ctx.aligned()
    state = _load_state(ctx) if settings["kind"] != "lora" else None
    train = [{"prompt": r["prompt"], "response": r["answer"]} for r in _task_records(ctx, "train")]
    return finetune(aligned, tok, train, _holdout(ctx), settings=settings, state=state, seed=seed, steps=cfg.steps,
                    lr=cfg.lr, rank=cfg.rank, lora_alpha=cfg.lora_alpha, batch=cfg.batch, targets=cfg.targets,
                    log_every=cfg.log_every, max_length=cfg.max_length, device=cfg.device, backend=cfg.backend,
                    progress=ctx.progress, desc=desc)


def _build_finetune(ctx: Context, stage: Stage, method: str, seed: int):
    def build(tmp):
        model, log = _train(ctx, stage.key["settings"], seed, desc=f"train {method} s{seed}")
        model.save_pretrained(os.path.join(tmp, "adapter"))
        atomic_write_json(os.path.join(tmp, "train_log.json"), {"method": method, **log})

    return build


def _build_evaluate(ctx: Context, stage: Stage, method: str, seed: int):
    def build(tmp):
        model, tok = ctx.tuned(method, seed)
        _evaluate_into(ctx, model, tok, ctx.work(stage.name, stage), tmp)

    return build


def _same_training(ctx: Context, settings: dict, seed: int) -> Optional[str]:
    """The method whose main-run fine-tune (``finetune/<method>-s<seed>``) trained with exactly these regulariser
    settings and this seed and is complete, or None. Its training is what the sweep point would repeat (same fields,
    data order and seed), so the sweep only adds the dev-split evaluation."""
    for m in ctx.cfg.methods:
        name = f"finetune/{m}-s{seed}"
        st = ctx.stages.get(name)
        if st is not None and st.key["settings"] == settings and st.status() is None:
            return m
    return None


def _build_sweep(ctx: Context, stage: Stage):
    from agl.experiment.evaluation import task_eval

    def build(tmp):
        cfg = ctx.cfg
        method, source = _same_training(ctx, stage.key["settings"], cfg.sweep_seed), None
        if method is not None:  # a main run trained exactly this: evaluate its adapter on the dev split
            source = f"finetune/{method}-s{cfg.sweep_seed}"
            model, _ = ctx.tuned(method, cfg.sweep_seed)
            log = _read_json(os.path.join(ctx.stages[source].path, "train_log.json"))
        else:
            model, log = _train(ctx, stage.key["settings"], cfg.sweep_seed, desc=f"sweep {stage.name[6:]}")
        task = task_eval(model, ctx._tok, _task_records(ctx, "dev"), max_new_tokens=cfg.task_max_new_tokens,
                         batch_size=cfg.task_eval_batch, device=cfg.device, progress=ctx.progress, desc="dev EM")
        atomic_write_json(os.path.join(tmp, "sweep.json"), {
            "settings": stage.key["settings"], "source": source or "trained", "dev_em": task["em"],
            "delta_align_loss": log["curve"][-1]["delta_align_loss"], "curve": log["curve"]})

    return build


def _build_report(ctx: Context, stage: Stage):
    from agl.experiment.report import build_report

    def build(tmp):
        build_report(ctx.cfg, {n: s.path for n, s in ctx.stages.items() if n != "report"}, tmp)

    return build


def run_pipeline(cfg: ExperimentConfig, *, model_factory: Optional[Callable] = None, progress: bool = True,
                 log: Callable[[str], None] = None) -> Dict[str, object]:
    """Runs (or resumes) every stage; returns ``{"out", "stages": {name: {"built", "seconds", "reason"}},
    "report": the report dict, "seconds"}``."""
    from tqdm.auto import tqdm

    t0 = time.time()
    os.makedirs(cfg.out, exist_ok=True)
    atomic_write_json(os.path.join(cfg.out, "config.json"), cfg.to_dict())
    ctx = Context(cfg, model_factory, progress, log)
    ctx.stages = _stage_plan(cfg)
    builders = {
        "aligned_start": _build_aligned_start, "eval_start": _build_eval_start,
        "alignment_state": _build_alignment_state, "task_data": _build_task_data,
    }
    order = ["task_data", "aligned_start", "eval_start", "alignment_state"]
    all_seeds = dict.fromkeys([*cfg.seeds, *(cfg.ablation_seeds or [])])  # ordered, no repeats
    for seed in all_seeds:  # seed by seed, so an interrupted run already has complete seeds
        for m in cfg.methods:
            if seed in cfg.seeds_for(m):
                order += [f"finetune/{m}-s{seed}", f"evaluate/{m}-s{seed}"]
    order += [n for n in ctx.stages if n.startswith("sweep/")]
    order += ["report"]
    summary = {}
    bar = tqdm(order, desc="stages", disable=not progress, unit="stage")
    for name in bar:
        stage = ctx.stages[name]
        bar.set_postfix_str(name)
        if name in builders:
            build = builders[name](ctx, stage)
        elif name.startswith("finetune/") or name.startswith("evaluate/"):
            method, seed = name.split("/", 1)[1].rsplit("-s", 1)
            fn = _build_finetune if name.startswith("finetune/") else _build_evaluate
            build = fn(ctx, stage, method, int(seed))
        elif name.startswith("sweep/"):
            build = _build_sweep(ctx, stage)
        else:
            build = _build_report(ctx, stage)
        res = stage.run(build)
        ctx.results[name] = res
        summary[name] = {"built": res.built, "seconds": round(res.seconds, 1), "reason": res.reason}
        if res.built:
            bar.write(f"  {name}: built in {res.seconds:.0f}s" + ("" if res.reason == "missing" else f" ({res.reason})"))
    bar.close()
    report = _read_json(os.path.join(ctx.stages["report"].path, "report.json"))
    return {"out": cfg.out, "stages": summary, "report": report, "seconds": time.time() - t0}
