"""The experiment's plan: every stage, its cache key (config fields + upstream hashes) and the runs that train the
frontier grids. No model, no I/O: ``stage_plan(cfg)`` is what ``run_pipeline`` executes, in this order."""
from __future__ import annotations

from typing import Dict, List

from agl.experiment.config import (EVAL_VERSION, STAGE_FIELDS, ExperimentConfig, Recipe, method_recipe, stable_hash,
                                   term_settings)
from agl.experiment.stages import Stage

__all__ = ["GRIDS", "settings_key", "recipe_hash", "grid_points", "run_names", "stage_plan", "KEYLESS_FIELDS"]

# the ExperimentConfig fields no stage key holds, and why: where or how fast an artefact is made, not what it is (up
# to float rounding). Every other field must change some stage key or the set of stages
# (tests/test_code_provenance.py fails on a field that is in neither): a new field that is not keyed would silently
# reuse artefacts built without it.
KEYLESS_FIELDS = {
    "out": "where the artefacts go",
    "device": "where they are computed (float rounding only)",
    "threads": "CPU threads (float rounding only)",
    "fisher_batch": "the Fisher is a sum of per-sample products: batching changes the rounding only",
    "eval_batch": "generation batch size (greedy decoding; rounding only)",
    "task_eval_batch": "generation batch size (greedy decoding; rounding only)",
}


def _fmt_lam(x: float) -> str:
    return f"{x:g}".replace("+", "")


def settings_key(settings) -> dict:
    """A fine-tune's regulariser as a JSON-able stage key: ``{"kind": "lora"}`` or ``{"kind": "agl", **fields}``."""
    return Recipe(settings).key()["settings"]


def recipe_hash(recipe: Recipe) -> str:
    return stable_hash(recipe.key())


# the frontier grids: (kind, axis, the config's grid field, label prefix, strength of a value: larger = stronger)
GRIDS = (("agl", "lambda", "sweep_agl", "l", float), ("agl", "budget", "sweep_budget", "b", lambda v: -v),
         ("ewc", "lambda", "sweep_ewc", "l", float), ("lora_lr", "lr", "sweep_lr", "", lambda v: -v),
         ("l2", "rho", "sweep_l2", "r", float), ("mix", "fraction", "sweep_mix", "p", float))


def grid_points(cfg: ExperimentConfig) -> List[dict]:
    """The frontier grids: ``{"kind", "axis", "value", "label", "recipe", "settings", "strength"}`` (``GRIDS``:
    AGL on λ_A or a budget, EWC on λ, plain LoRA on its learning rate, L2-SP on ρ, safety-data mixing on the
    refusal fraction; strength: larger = more regularisation, so a smaller budget or learning rate is stronger),
    then the term sweeps (kind ``"term"``, dev data only, not on the frontier): ``agl-base`` (axis None: every
    swept term at 0) and ``agl-t<w>``, ``agl-o<w>``, ``agl-g<w>`` (axis = the term, value = strength = its weight;
    config.term_settings). ``settings`` is the recipe's regulariser."""
    out = []
    for kind, axis, field, prefix, strength in GRIDS:
        for v in getattr(cfg, field):
            r = method_recipe(cfg, kind, budget=v) if axis == "budget" else method_recipe(cfg, kind, v)
            out.append({"kind": kind, "axis": axis, "value": float(v), "recipe": r, "settings": r.settings,
                        "label": f"{kind}-{prefix}{_fmt_lam(v)}", "strength": strength(float(v))})
    terms = [(t, w) for t, ws in cfg.sweep_terms.items() for w in ws]
    if terms:
        out.append({"kind": "term", "axis": None, "value": 0.0, "recipe": Recipe(term_settings(cfg)),
                    "settings": term_settings(cfg), "label": "agl-base", "strength": 0.0})
    for t, w in terms:
        st = term_settings(cfg, t, w)
        out.append({"kind": "term", "axis": t, "value": w, "recipe": Recipe(st), "settings": st,
                    "label": f"agl-{t[0]}{_fmt_lam(w)}", "strength": w})
    return out


def run_names(cfg: ExperimentConfig) -> Dict[str, Dict[int, str]]:
    """label -> seed -> the fine-tune run that trains it. A grid point whose settings and seed a main method
    already trains maps to that method's run (trained once); a term point also maps to an earlier grid point's run
    with its settings (the frontier points only look at the main methods, as they always did); LoRA is always
    ``lora``."""
    main = {}
    for m in cfg.methods:
        if m != "safe_lora":
            for s in cfg.seeds_for(m):
                main.setdefault((recipe_hash(method_recipe(cfg, m)), s), m)
    shared = dict(main)  # main runs, then every grid point's run in order
    out = {"lora": {s: "lora" for s in dict.fromkeys([*cfg.grid_seeds(), *cfg.seeds])}}
    for p in grid_points(cfg):
        h = recipe_hash(p["recipe"])
        runs = shared if p["kind"] == "term" else main
        out[p["label"]] = {s: runs.get((h, s), p["label"]) for s in cfg.grid_seeds()}
        for s, run in out[p["label"]].items():
            shared.setdefault((h, s), run)
    return out


def stage_plan(cfg: ExperimentConfig) -> Dict[str, Stage]:
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
    train_up = ["aligned_start", "task_data", "alignment_state"]  # every run logs the predicted rise: all need F

    def train(run, seed, recipe: Recipe):
        if f"finetune/{run}-s{seed}" not in S:
            add(f"finetune/{run}-s{seed}", "finetune", train_up, extra={**recipe.key(), "seed": seed})

    def evaluate(run, seed):
        if f"evaluate/{run}-s{seed}" not in S:
            add(f"evaluate/{run}-s{seed}", "evaluate", [f"finetune/{run}-s{seed}", "task_data"],
                extra={"eval_version": EVAL_VERSION})

    def dev(run, seed):
        if f"dev/{run}-s{seed}" not in S:
            add(f"dev/{run}-s{seed}", "dev", [f"finetune/{run}-s{seed}", "task_data"],
                extra={"eval_version": EVAL_VERSION})

    for m in cfg.methods:
        if m != "safe_lora":
            for s in cfg.seeds_for(m):
                train(m, s, method_recipe(cfg, m))
                evaluate(m, s)
    names = run_names(cfg)
    points = grid_points(cfg)
    frontier = [p for p in points if p["kind"] != "term"]  # term points are dev-only: never evaluated
    if points or "safe_lora" in cfg.methods:  # LoRA's dev EM is the operating-point rules' reference
        for s in (cfg.grid_seeds() if points else []) + (cfg.seeds if "safe_lora" in cfg.methods else []):
            train("lora", s, Recipe())
            dev("lora", s)
        if cfg.sweep_eval:
            for s in cfg.grid_seeds() if frontier else []:
                evaluate("lora", s)
    for p in points:
        for s in cfg.grid_seeds():
            run = names[p["label"]][s]
            train(run, s, p["recipe"])
            dev(run, s)
            if cfg.sweep_eval and p["kind"] != "term":
                evaluate(run, s)
    if "safe_lora" in cfg.methods:
        lora_up = [f"finetune/lora-s{s}" for s in cfg.seeds] + [f"dev/lora-s{s}" for s in cfg.seeds]
        add("safe_lora/threshold", "safe_lora", ["aligned_start", "task_data", "alignment_state", *lora_up],
            extra={"seeds": list(cfg.seeds), "eval_version": EVAL_VERSION})
        for s in cfg.seeds:
            add(f"finetune/safe_lora-s{s}", None, ["safe_lora/threshold", f"finetune/lora-s{s}"], extra={"seed": s})
            evaluate("safe_lora", s)
    up = [n for n in S]
    add("report", None, up, extra={"n_boot": cfg.n_boot, "law_with_offset": cfg.law_with_offset,
                                   "methods": list(cfg.methods), "em_tolerance": cfg.em_tolerance,
                                   "frontier_agl": cfg.frontier_agl, "grid_seeds": cfg.grid_seeds(),
                                   "seeds": {m: cfg.seeds_for(m) for m in cfg.methods},
                                   # only with sweeps, so the keys of runs without them stay as they were
                                   **({"sweep_terms": cfg.sweep_terms} if cfg.sweep_terms else {})})
    return S
