"""The experiment pipeline, stages 1-6, each cached and resumable (see ``agl.experiment.stages``).

Artefacts under ``cfg.out``::

    aligned_start/            stage 1: SFT adapter of the aligned start, its data, held-out refusal demos
    eval_start/               the aligned start on the DriftCaps eval prompts and the task test split
    alignment_state/          stage 2: agl.AlignmentState of the aligned start (task LoRA layout)
    task_data/                stage 3: the generated task (train/dev/test)
    finetune/<run>-s<seed>/   stage 3: LoRA adapter + training log (measured and predicted alignment-loss rise);
                              <run> = a method, or a frontier grid point (agl-l<λ>, agl-b<budget>, ewc-l<λ>,
                              lora_lr-<lr>, l2-r<ρ>, mix-p<fraction>),
                              or a term-sweep point (agl-base, agl-t<w>, agl-o<w>, agl-g<w>; dev only);
                              safe_lora = LoRA's adapter projected (no training); checkpoints/step-<k>/: the
                              adapter at every logged step (bench/curvature_decomposition.py); train_log.json has
                              grad_shares (regularised runs) or grad_shares_unit (LoRA) at the final adapter
    evaluate/<run>-s<seed>/   stage 4: DriftCaps records + task exact-match (eval split / task test split)
    dev/<run>-s<seed>/        task dev EM (what the pre-registered operating-point rule reads)
    safe_lora/threshold/      Safe LoRA's threshold, chosen on dev data
    report/                   stages 5-6: report.json, report.md, PNG plots
    work/                     resumable generation caches (safe to delete)

The model is loaded only when some stage has to be built, so a fully cached re-run takes seconds.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Callable, Dict, List, Optional

from agl._io import atomic_write_json, read_jsonl
from agl.experiment.config import ExperimentConfig
from agl.experiment.config import Recipe
from agl.experiment.plan import stage_plan
from agl.experiment.stages import Stage, StageResult

__all__ = ["run_pipeline", "Context"]


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
        self.provenance: Optional[dict] = None
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

        from agl.models import save_plain

        tmp = cache + f".tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            save_plain(model, tmp, tok)
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


def _read_json(path: str):
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def load_finetune(run_dir: str, run: str = "lora", seed: int = 0):
    """``(model, state, cfg)`` of a finished fine-tune in an experiment output directory (its ``config.json``): the
    aligned start with the run's adapter, only its LoRA factors trainable (for gradient probes), the run's
    AlignmentState and its ExperimentConfig."""
    from agl.experiment.config import ExperimentConfig

    cfg = ExperimentConfig(**{**_read_json(os.path.join(run_dir, "config.json")), "out": run_dir})
    ctx = Context(cfg, progress=False)
    ctx.stages = stage_plan(cfg)
    model, _ = ctx.tuned(run, seed)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    return model, _load_state(ctx), cfg


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
    return read_jsonl(os.path.join(ctx.stages["aligned_start"].path, "holdout.jsonl"))


def _build_alignment_state(ctx: Context, stage: Stage):
    def build(tmp):
        import copy

        import torch
        from peft import get_peft_model

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
                                         progress=ctx.progress, cross_curvature=cfg.fisher_cross)
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


def mix_pool(ctx: Context) -> List[dict]:
    """Safety-data mixing's refusal demonstrations: the aligned start's SFT refusal demonstrations that the alignment
    state did not use (those past the first ``fisher_samples``), so they are disjoint from the state's data, from
    the held-out demonstrations of ΔL_align and (calibration split) from every eval prompt."""
    cfg = ctx.cfg
    demos = read_jsonl(os.path.join(ctx.stages["aligned_start"].path, "refusal_demos.jsonl"))
    pool = [{"prompt": r["prompt"], "response": r["response"]} for r in demos[cfg.fisher_samples:]]
    if not pool:
        raise ValueError(f"method mix: the aligned start has {len(demos)} refusal demonstrations and the alignment "
                         f"state uses the first fisher_samples={cfg.fisher_samples}, which leaves none to mix in; "
                         f"lower fisher_samples or raise align_n_unsafe")
    return pool


def _build_finetune(ctx: Context, stage: Stage, run: str, seed: int):
    def build(tmp):
        from agl.experiment.train import finetune

        cfg = ctx.cfg
        recipe = Recipe.from_key(stage.key)
        aligned, tok = ctx.aligned()
        train = [{"prompt": r["prompt"], "response": r["answer"]} for r in _task_records(ctx, "train")]
        model, log = finetune(aligned, tok, train, _holdout(ctx), settings=recipe.settings,
                              mix_records=mix_pool(ctx) if recipe.mix else (), mix_fraction=recipe.mix,
                              state=_load_state(ctx), seed=seed, steps=cfg.steps,
                              lr=cfg.lr if recipe.lr is None else recipe.lr, rank=cfg.rank,
                              lora_alpha=cfg.lora_alpha, batch=cfg.batch, targets=cfg.targets,
                              log_every=cfg.log_every, max_length=cfg.max_length, device=cfg.device,
                              progress=ctx.progress, desc=f"train {run} s{seed}", unit_probe=cfg.agl,
                              on_log=lambda step, m: m.save_pretrained(os.path.join(tmp, "checkpoints", f"step-{step}")))
        model.save_pretrained(os.path.join(tmp, "adapter"))
        atomic_write_json(os.path.join(tmp, "train_log.json"), {"method": run, **log})

    return build


def _build_evaluate(ctx: Context, stage: Stage, run: str, seed: int):
    def build(tmp):
        model, tok = ctx.tuned(run, seed)
        _evaluate_into(ctx, model, tok, ctx.work(stage.name, stage), tmp)

    return build


def _dev_em(ctx: Context, model, desc: str, cache: Optional[str] = None) -> dict:
    from agl.experiment.evaluation import task_eval

    cfg = ctx.cfg
    return task_eval(model, ctx._tok, _task_records(ctx, "dev"), max_new_tokens=cfg.task_max_new_tokens,
                     batch_size=cfg.task_eval_batch, device=cfg.device, progress=ctx.progress, desc=desc, cache=cache)


def _build_dev(ctx: Context, stage: Stage, run: str, seed: int):
    """Task dev EM of one fine-tune (what the operating-point rule reads), with its calibration ΔL_align."""

    def build(tmp):
        model, _ = ctx.tuned(run, seed)
        task = _dev_em(ctx, model, f"dev EM {run} s{seed}", os.path.join(ctx.work(stage.name, stage), "dev.jsonl"))
        log = _read_json(os.path.join(ctx.stages[f"finetune/{run}-s{seed}"].path, "train_log.json"))
        atomic_write_json(os.path.join(tmp, "dev.json"), {
            "run": run, "seed": seed, "dev_em": task["em"], "n": task["n"],
            "delta_align_loss": log["curve"][-1]["delta_align_loss"]})

    return build


def _build_safe_lora_threshold(ctx: Context, stage: Stage):
    """Safe LoRA's threshold by the pre-registered rule, on dev data: candidate thresholds project the fractions
    ``safe_lora_fractions`` of the (pooled over seeds) layers; the strongest candidate whose mean dev EM is within
    ``em_tolerance`` of LoRA's is chosen (none: nothing is projected)."""

    def build(tmp):
        from agl.experiment import safe_lora as sl
        from agl.experiment.frontier import choose_operating_point

        cfg = ctx.cfg
        seeds = stage.key["seeds"]
        base, _ = ctx.base()
        proj, sims = None, {}
        for s in seeds:
            model, _ = ctx.tuned("lora", s)
            proj = proj or sl.alignment_projections(model, base)
            sims[s] = sl.layer_similarities(model, proj)
            del model
        pooled = [v for d in sims.values() for v in d.values()]
        taus = sl.candidate_thresholds(pooled, cfg.safe_lora_fractions)
        cands = []
        for f, tau in zip(cfg.safe_lora_fractions, taus):
            ems = []
            for s in seeds:
                model, _ = ctx.tuned("lora", s)
                sl.apply_projection(model, proj, tau)
                ems.append(_dev_em(ctx, model, f"Safe LoRA dev τ={tau:.3g} s{s}")["em"])
                del model
            cands.append({"fraction": f, "tau": tau, "strength": f, "dev_em": sum(ems) / len(ems), "dev_em_per_seed": ems})
        lora_em = [_read_json(os.path.join(ctx.stages[f"dev/lora-s{s}"].path, "dev.json"))["dev_em"] for s in seeds]
        lora_dev_em = sum(lora_em) / len(lora_em)
        pick = choose_operating_point(cands, lora_dev_em, cfg.em_tolerance)
        atomic_write_json(os.path.join(tmp, "threshold.json"), {
            "tau": None if pick is None else pick["tau"], "fraction": None if pick is None else pick["fraction"],
            "rule": f"the largest fraction of projected layers whose mean dev EM >= LoRA's - {cfg.em_tolerance}",
            "lora_dev_em": lora_dev_em, "candidates": cands,
            "similarities": {str(s): d for s, d in sims.items()}})

    return build


def _build_safe_lora(ctx: Context, stage: Stage, seed: int):
    """The LoRA fine-tune of ``seed`` projected at the chosen threshold; its log holds the measured and predicted
    rise of the alignment loss before and after the projection."""

    def build(tmp):
        from agl.experiment import safe_lora as sl
        from agl.experiment._common import chat_batches, mean_nll
        from agl.experiment.train import AlignmentProbe

        cfg = ctx.cfg
        th = _read_json(os.path.join(ctx.stages["safe_lora/threshold"].path, "threshold.json"))
        log = _read_json(os.path.join(ctx.stages[f"finetune/lora-s{seed}"].path, "train_log.json"))
        model, tok = ctx.tuned("lora", seed)
        base, _ = ctx.base()
        proj = sl.alignment_projections(model, base)
        layers = sl.apply_projection(model, proj, -math.inf if th["tau"] is None else th["tau"])
        hold = chat_batches(tok, _holdout(ctx), cfg.max_length, 16)
        L0, before = log["curve"][0]["align_loss"], log["curve"][-1]
        after = {"step": before["step"], "tokens": before["tokens"], "align_loss": mean_nll(model, hold, cfg.device),
                 **AlignmentProbe(model, _load_state(ctx))()}
        after["delta_align_loss"] = after["align_loss"] - L0
        model.save_pretrained(os.path.join(tmp, "adapter"))
        atomic_write_json(os.path.join(tmp, "train_log.json"), {
            # LoRA's log, less its gradient shares (measured on the adapter before the projection)
            **{k: v for k, v in log.items() if not k.startswith("grad_shares")},
            "method": "safe_lora", "source": f"finetune/lora-s{seed}",
            "projection": {"tau": th["tau"], "n_projected": sum(v["projected"] for v in layers.values()),
                           "n_layers": len(layers), "layers": layers, "before": before, "after": after}})

    return build


def _build_report(ctx: Context, stage: Stage):
    from agl.experiment.report import build_report

    def build(tmp):
        build_report(ctx.cfg, {n: s.path for n, s in ctx.stages.items() if n != "report"}, tmp,
                     provenance=ctx.provenance)

    return build


def _builder(ctx: Context, name: str):
    stage = ctx.stages[name]
    fixed = {"aligned_start": _build_aligned_start, "eval_start": _build_eval_start,
             "alignment_state": _build_alignment_state, "task_data": _build_task_data,
             "safe_lora/threshold": _build_safe_lora_threshold, "report": _build_report}
    if name in fixed:
        return fixed[name](ctx, stage)
    kind, rest = name.split("/", 1)
    run, seed = rest.rsplit("-s", 1)
    if kind == "finetune" and run == "safe_lora":
        return _build_safe_lora(ctx, stage, int(seed))
    return {"finetune": _build_finetune, "evaluate": _build_evaluate, "dev": _build_dev}[kind](ctx, stage, run, int(seed))


def _run_order(cfg: ExperimentConfig, stages: Dict[str, Stage]) -> List[str]:
    """The plan's order (already topological), except that every seed's fine-tunes, evaluations and dev stages
    (main methods first, then the grids) go seed by seed, so an interrupted run already has complete seeds; Safe
    LoRA (its threshold reads every seed) and the report come last."""
    head = ["task_data", "aligned_start", "eval_start", "alignment_state"]
    per_seed = []
    for seed in dict.fromkeys([*cfg.seeds, *cfg.grid_seeds(), *(cfg.ablation_seeds or [])]):
        per_seed += [n for n in stages if n.split("/")[0] in ("finetune", "evaluate", "dev")
                     and n.rsplit("-s", 1)[-1] == str(seed) and not n.split("/")[1].startswith("safe_lora-")]
    rest = [n for n in stages if n not in head and n not in per_seed and n != "report"]
    return head + per_seed + rest + ["report"]


def run_pipeline(cfg: ExperimentConfig, *, model_factory: Optional[Callable] = None, progress: bool = True,
                 log: Callable[[str], None] = None) -> Dict[str, object]:
    """Runs (or resumes) every stage; returns ``{"out", "stages": {name: {"built", "seconds", "reason"}},
    "report": the report dict, "seconds"}``."""
    from tqdm.auto import tqdm

    from agl._provenance import provenance

    t0 = time.time()
    os.makedirs(cfg.out, exist_ok=True)
    atomic_write_json(os.path.join(cfg.out, "config.json"), cfg.to_dict())
    ctx = Context(cfg, model_factory, progress, log)
    ctx.provenance = provenance()  # at the start: the load the run started under
    ctx.stages = stage_plan(cfg)
    summary = {}
    bar = tqdm(_run_order(cfg, ctx.stages), desc="stages", disable=not progress, unit="stage")
    for name in bar:
        bar.set_postfix_str(name)
        res = ctx.stages[name].run(_builder(ctx, name))
        ctx.results[name] = res
        summary[name] = {"built": res.built, "seconds": round(res.seconds, 1), "reason": res.reason}
        if res.built:
            bar.write(f"  {name}: built in {res.seconds:.0f}s" + ("" if res.reason == "missing" else f" ({res.reason})"))
    bar.close()
    report = _read_json(os.path.join(ctx.stages["report"].path, "report.json"))
    return {"out": cfg.out, "stages": summary, "report": report, "seconds": time.time() - t0}
