"""The experiment's configuration: one dataclass, loadable from a JSON or TOML file and overridable by flags.

Every stage of the pipeline depends on a subset of the fields (``STAGE_FIELDS``); its cache key is a stable hash of
those fields' values plus the keys of the stages it reads from, so changing, say, the number of fine-tuning steps
reruns the fine-tunes and what follows, but reuses the aligned start and the alignment state.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Sequence

from agl.loss import AGLConfig

__all__ = [
    "ABLATIONS", "ALL_METHODS", "EVAL_VERSION", "METHOD_LABELS", "ExperimentConfig", "Recipe", "agl_settings",
    "demo_config", "load_config", "method_recipe", "method_settings", "stable_hash", "SWEEP_TERMS", "term_settings",
]

# the methods, in report order
ALL_METHODS = ("lora", "agl", "agl_diagonal", "agl_cross", "no_fisher", "no_task", "no_collision", "overlap_only",
               "geodesic_only", "ewc", "safe_lora", "lora_lr", "l2", "mix")
ABLATIONS = ("no_fisher", "no_task", "no_collision", "overlap_only", "geodesic_only")
# the methods' display names (report tables, plots, the README)
METHOD_LABELS = {"lora": "LoRA", "agl": "AGL", "no_fisher": "AGL − Fisher (λ_A=0)", "no_task": "AGL − task (λ_T=0)",
                 "no_collision": "AGL − collision (λ_NC=0)", "overlap_only": "overlap only (α=1)",
                 "geodesic_only": "geodesic only (α=0)", "ewc": "EWC (F⊙ΔW², whole ΔW)",
                 "safe_lora": "Safe LoRA (projected)", "lora_lr": "LoRA, lower lr", "l2": "L2-SP (½ρ‖ΔW‖²)",
                 "mix": "safety-data mixing", "agl_cross": "AGL, cross-layer metric",
                 "agl_diagonal": "AGL, diagonal metric"}


def stable_hash(obj: Any) -> str:
    """sha256 (16 hex digits) of the canonical JSON of ``obj`` (sorted keys, floats by repr)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class ExperimentConfig:
    """Everything the pipeline needs. Field groups: model/run, stage 1 (aligned start), stage 2 (alignment
    state), stage 3 (task data and fine-tunes), stage 4 (evaluation), stage 5 (law fit), sweeps."""

    # --- model and run
    model: str = "smollm2-135m-instruct"
    device: str = "cpu"
    dtype: str = "float32"
    out: str = "runs/experiment"
    prompts: str = "builtin"  # DriftCaps prompt source (built-in set or a JSONL path in its schema)
    refusals: str = "builtin"  # refusal texts for SFT ("builtin" = agl/experiment/data/refusals.jsonl)
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])
    # the default list leaves out agl_diagonal / agl_cross (one of them is `agl` itself: name them to compare)
    methods: List[str] = field(default_factory=lambda: [m for m in ALL_METHODS if m not in ("agl_diagonal", "agl_cross")])
    threads: int = 0  # torch.set_num_threads; 0 = leave torch's default
    # seeds for the five ablations (None: `seeds`); fewer seeds there buys the main methods more on a small machine
    ablation_seeds: Optional[List[int]] = None

    # --- stage 1: aligned start (LoRA SFT on calibration prompts, then merged)
    align_n_unsafe: int = 160
    align_n_safe: int = 120
    align_holdout: int = 32  # calibration unsafe prompts kept out of the SFT: held-out refusal demos (ΔL_align)
    align_dev_safe: int = 48  # calibration safe prompts kept out of the SFT (tuning-dev, with the unsafe hold-out)
    align_n_borderline: int = 93  # the project's own borderline-safe prompts in the SFT (data/borderline.jsonl)
    # more of them, from data/borderline_more.jsonl (0: left out of the stage key, so older starts keep theirs); 120
    # and 120 steps: the second tuning attempt's choice (docs/results/2026-12-05-aligned-start; was 0 and 90)
    align_n_borderline_more: int = 120
    align_distill_filter: bool = True  # re-ask (steered) or drop distilled safe answers the judge calls refusals
    align_steps: int = 120
    align_rank: int = 16
    align_lr: float = 3e-4
    align_batch: int = 8
    align_targets: str = "all-linear"
    distill_max_new_tokens: int = 64
    max_length: int = 192
    align_seed: int = 1234

    # --- stage 2: alignment state
    fisher_samples: int = 128
    fisher_kind: str = "empirical"
    fisher_energy: float = 0.9
    fisher_max_rank: int = 64
    fisher_batch: int = 8
    fisher_cross: bool = True  # also store the projected per-sample gradients (AGLConfig(curvature="cross"))

    # --- stage 3: task data and fine-tunes
    task_train: int = 2000
    task_dev: int = 200  # for choosing hyperparameters (never the test split)
    task_test: int = 300
    task_seed: int = 7
    steps: int = 80
    lr: float = 3e-4
    rank: int = 16
    lora_alpha: int = 32
    batch: int = 8
    targets: List[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    log_every: int = 5  # alignment loss on the held-out refusal demos every K steps
    # the regulariser: one agl.loss.AGLConfig (its defaults are the package's); every method is a
    # dataclasses.replace of it (method_settings); keys `agl.<field>` or a table [experiment.agl] set its fields
    agl: AGLConfig = field(default_factory=AGLConfig)

    # --- stage 4: evaluation
    eval_split: str = "eval"
    eval_n_unsafe: Optional[int] = None  # subset sizes (None = all), a fixed seeded sample
    eval_n_safe: Optional[int] = None
    eval_max_new_tokens: int = 64
    eval_batch: int = 16
    task_max_new_tokens: int = 12
    task_eval_batch: int = 32
    n_boot: int = 1000

    # --- stage 5: law fit
    law_with_offset: bool = False

    # --- frontier: grids of settings, each trained on `sweep_seeds` (None: `seeds`), evaluated on the task dev
    # split (for choosing) and, with `sweep_eval`, on the eval split (for the frontier's numbers)
    sweep_agl: List[float] = field(default_factory=list)  # λ_A values for AGL
    sweep_budget: List[float] = field(default_factory=list)  # align_budget values (nats) for AGL
    sweep_ewc: List[float] = field(default_factory=list)  # λ values for EWC (AGLConfig.ewc)
    sweep_lr: List[float] = field(default_factory=list)  # learning rates for plain LoRA (method lora_lr)
    sweep_l2: List[float] = field(default_factory=list)  # ρ values for L2-SP (AGLConfig.l2)
    sweep_mix: List[float] = field(default_factory=list)  # refusal-demonstration fractions for safety-data mixing
    # term sweeps (dev data only, never evaluated): term -> weights, terms among SWEEP_TERMS; each point is cfg.agl
    # with the other extra terms off (plan.grid_points); chosen by frontier.choose_term_weight
    sweep_terms: Dict[str, List[float]] = field(default_factory=dict)
    sweep_seeds: Optional[List[int]] = None
    sweep_eval: bool = True
    frontier_agl: str = "auto"  # AGL's frontier curve: "lambda", "budget", or "auto" (budget when swept)
    # the pre-registered operating-point rule: the strongest setting whose dev EM >= LoRA's dev EM - this
    em_tolerance: float = 0.02
    # the ladder's baselines at their main setting (the methods table; their grids are sweep_lr/_l2/_mix)
    lora_lr: float = 1e-4  # method lora_lr: plain LoRA at this learning rate
    l2_rho: float = 1.0  # method l2: ρ of ½ρ·Σ‖ΔW‖²_F (AGLConfig.l2)
    mix_fraction: float = 0.03  # method mix: this fraction of the fine-tune's examples are refusal demonstrations
    # method agl_cross: λ_A in the cross-layer metric (None: the `agl` config's); rule 9 chose 30 (docs/EXPERIMENT.md)
    lambda_cross: Optional[float] = None
    # Safe LoRA: candidate thresholds = the similarity quantiles that project these fractions of the layers
    safe_lora_fractions: List[float] = field(default_factory=lambda: [0.1, 0.25, 0.5, 0.75, 1.0])

    def __post_init__(self):
        if isinstance(self.agl, dict):  # from a file or asdict()
            self.agl = agl_config_from_dict(self.agl)
        self.validate()
        # one order (SWEEP_TERMS', weights ascending, no repeats): the plan and the report follow it
        self.sweep_terms = {k: sorted({float(w) for w in self.sweep_terms[k]}) for k in SWEEP_TERMS
                            if k in self.sweep_terms}

    def validate(self) -> None:
        bad = [m for m in self.methods if m not in ALL_METHODS]
        if bad:
            raise ValueError(f"unknown method(s) {bad}; choose from {list(ALL_METHODS)}")
        if not self.methods:
            raise ValueError("`methods` is empty")
        if "safe_lora" in self.methods and "lora" not in self.methods:
            raise ValueError("`methods`: safe_lora projects the LoRA fine-tunes, so it needs 'lora' too")
        if not self.seeds:
            raise ValueError("`seeds` is empty")
        for name in ("ablation_seeds", "sweep_seeds"):
            if getattr(self, name) is not None and not getattr(self, name):
                raise ValueError(f"`{name}` is empty (use null for the same seeds as `seeds`)")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"`device` must be cpu or cuda, got {self.device!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"`dtype` must be float32, bfloat16 or float16, got {self.dtype!r}")
        for name in ("steps", "align_steps", "batch", "align_batch", "rank", "align_rank", "log_every",
                     "task_test", "task_train", "fisher_samples", "eval_batch"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"`{name}` must be positive, got {getattr(self, name)!r}")
        if self.log_every > self.steps:
            raise ValueError(f"`log_every` ({self.log_every}) is larger than `steps` ({self.steps})")
        if not isinstance(self.agl, AGLConfig):
            raise ValueError(f"`agl` must be an agl.AGLConfig or a table of its fields, got {type(self.agl).__name__}")
        agl_settings(self.agl)  # JSON-able (a file cannot hold a task-Fisher state or a callable layer filter)
        if self.frontier_agl not in ("auto", "lambda", "budget"):
            raise ValueError(f"`frontier_agl` must be auto, lambda or budget, got {self.frontier_agl!r}")
        if any(not 0.0 < f <= 1.0 for f in self.safe_lora_fractions) or not self.safe_lora_fractions:
            raise ValueError(f"`safe_lora_fractions` must be fractions in (0, 1], got {self.safe_lora_fractions!r}")
        if self.lambda_cross is not None and not (isinstance(self.lambda_cross, (int, float)) and self.lambda_cross >= 0):
            raise ValueError(f"`lambda_cross` must be a weight >= 0 or null, got {self.lambda_cross!r}")
        if any(v < 0 for v in self.sweep_agl + self.sweep_ewc + self.sweep_budget + self.sweep_l2 + [self.l2_rho]):
            raise ValueError("`sweep_agl`, `sweep_ewc`, `sweep_budget`, `sweep_l2` and `l2_rho` must be >= 0")
        if any(not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0) for v in self.sweep_lr + [self.lora_lr]):
            raise ValueError(f"`lora_lr` and `sweep_lr` must be learning rates > 0, got {self.lora_lr!r}, "
                             f"{self.sweep_lr!r}")
        if any(not 0.0 < v < 1.0 for v in self.sweep_mix + [self.mix_fraction]):
            raise ValueError(f"`mix_fraction` and `sweep_mix` must be fractions in (0, 1), got {self.mix_fraction!r}, "
                             f"{self.sweep_mix!r}")
        _check_sweep_terms(self.sweep_terms)

    # -- serialisation
    def to_dict(self) -> Dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "agl"}
        return {**json.loads(json.dumps(d)), "agl": agl_settings(self.agl)}

    def replace(self, **kw) -> "ExperimentConfig":
        return dataclasses.replace(self, **kw)

    def seeds_for(self, method: str) -> List[int]:
        """The seeds ``method`` runs with: ``ablation_seeds`` for the ablations (when set), else ``seeds``."""
        if self.ablation_seeds is not None and method in ABLATIONS:
            return list(self.ablation_seeds)
        return list(self.seeds)

    def grid_seeds(self) -> List[int]:
        return list(self.sweep_seeds if self.sweep_seeds is not None else self.seeds)

    def key(self, names: Sequence[str]) -> Dict[str, Any]:
        """The values of ``names``; a field added after runs were cached is left out at its old behaviour's value
        (``KEY_OMIT_AT``), so those runs' keys stay as they were."""
        return {n: getattr(self, n) for n in names if n not in KEY_OMIT_AT or getattr(self, n) != KEY_OMIT_AT[n]}


# the terms `sweep_terms` may sweep: term -> (the weight it sets, what else it fixes); see term_settings
SWEEP_TERMS = {"task": ("lambda_task", {}), "overlap": ("lambda_collision", {"alpha": 1.0}),
               "geodesic": ("lambda_collision", {"alpha": 0.0})}


def _check_sweep_terms(st) -> None:
    expected = f"a table {{term: [weight, ...]}} with terms among {sorted(SWEEP_TERMS)} and weights >= 0"
    if not isinstance(st, dict):
        raise ValueError(f"`sweep_terms` must be {expected}, got {type(st).__name__}")
    bad = sorted(k for k in st if k not in SWEEP_TERMS)
    if bad:
        raise ValueError(f"`sweep_terms`: unknown term(s) {bad}; expected {expected}")
    for k, ws in st.items():
        ok = isinstance(ws, (list, tuple)) and all(isinstance(w, (int, float)) and not isinstance(w, bool)
                                                   and math.isfinite(w) and w >= 0 for w in ws)
        if not ok:
            raise ValueError(f"`sweep_terms[{k!r}]` must be a list of finite weights >= 0, got {ws!r}; expected "
                             f"{expected}")


# which fields each stage depends on (besides its upstream stages' keys); `out`, `device`, `threads`, `n_boot` and
# batch sizes for inference are left out on purpose: they do not change the artefact (up to float rounding). The
# fine-tunes' keys also hold their method's whole AGLConfig (method_settings), so every AGL field is in them.
STAGE_FIELDS = {
    "aligned_start": ["model", "dtype", "prompts", "refusals", "align_n_unsafe", "align_n_safe", "align_holdout",
                      "align_dev_safe", "align_n_borderline", "align_n_borderline_more", "align_distill_filter",
                      "align_steps", "align_rank", "align_lr", "align_batch", "align_targets",
                      "distill_max_new_tokens", "max_length", "align_seed"],
    "eval_start": ["eval_split", "eval_n_unsafe", "eval_n_safe", "eval_max_new_tokens"],
    "alignment_state": ["fisher_samples", "fisher_kind", "fisher_energy", "fisher_max_rank", "rank", "lora_alpha",
                        "targets", "fisher_cross"],
    "task_data": ["task_train", "task_dev", "task_test", "task_seed"],
    "finetune": ["steps", "lr", "rank", "lora_alpha", "batch", "targets", "log_every", "max_length"],
    "evaluate": ["eval_split", "eval_n_unsafe", "eval_n_safe", "eval_max_new_tokens", "task_max_new_tokens"],
    "dev": ["task_max_new_tokens"],
    "safe_lora": ["safe_lora_fractions", "em_tolerance", "task_max_new_tokens"],
}

# stage-key fields omitted at these values (ExperimentConfig.key): what the recipe did before the field existed
KEY_OMIT_AT = {"align_n_borderline_more": 0}

# bump when generation changes in a way that invalidates evaluation artefacts (2: stop at the chat end-of-turn token;
# 3: generation through agl.driftcaps.harness)
EVAL_VERSION = 3

# the ablations: what each changes in the AGL config (a budget is a λ_A, so it goes wherever λ_A goes to 0)
ABLATION_CHANGES = {
    "no_fisher": {"lambda_align": 0.0},
    "no_task": {"lambda_task": 0.0},
    "no_collision": {"lambda_collision": 0.0},
    "overlap_only": {"alpha": 1.0, "lambda_align": 0.0, "lambda_task": 0.0},
    "geodesic_only": {"alpha": 0.0, "lambda_align": 0.0, "lambda_task": 0.0},
}


def agl_settings(c: AGLConfig) -> Dict[str, Any]:
    """The AGL config as a JSON-able dict of all its fields, weights resolved (``AGLConfig.to_dict(resolve=True)``:
    what the fine-tune stages hash); a task-Fisher state or a callable layer filter raises a ValueError."""
    try:
        out = c.to_dict(resolve=True)
    except ValueError as exc:
        raise ValueError(f"`agl`: {exc}") from None
    if out["curvature"] == "diagonal":
        del out["curvature"]  # the field's default before it existed: keys of runs without it stay as they were
    return out


def agl_config_from_dict(d: Dict[str, Any]) -> AGLConfig:
    """An AGLConfig from a table of its fields; unknown keys raise a ValueError naming them."""
    if not isinstance(d, dict):
        raise ValueError(f"`agl` must be a table of AGLConfig fields, got {type(d).__name__}")
    return AGLConfig.from_dict(d, prefix="agl.")


@dataclass(frozen=True)
class Recipe:
    """How one fine-tune trains: ``settings``, its regulariser (an AGLConfig; None: task loss only), ``lr`` (None:
    the config's ``lr``) and ``mix``, the fraction of its training examples that are refusal demonstrations
    (safety-data mixing; 0: none). Its :meth:`key` is what the fine-tune stage hashes."""

    settings: Optional[AGLConfig] = None
    lr: Optional[float] = None
    mix: float = 0.0

    def key(self) -> Dict[str, Any]:
        """``{"settings": {"kind": "lora"} | {"kind": "agl", **fields}}``, plus ``lr`` / ``mix`` only when they
        differ from the defaults (so the keys of runs made before they existed stay as they were)."""
        k: Dict[str, Any] = {"settings": ({"kind": "lora"} if self.settings is None
                                          else {"kind": "agl", **agl_settings(self.settings)})}
        if self.lr is not None:
            k["lr"] = float(self.lr)
        if self.mix:
            k["mix"] = float(self.mix)
        return k

    @classmethod
    def from_key(cls, key: Dict[str, Any]) -> "Recipe":
        s = key["settings"]
        settings = None if s["kind"] == "lora" else agl_config_from_dict({k: v for k, v in s.items() if k != "kind"})
        return cls(settings, key.get("lr"), float(key.get("mix", 0.0)))


def method_recipe(cfg: ExperimentConfig, method: str, value: Optional[float] = None, *,
                  budget: Optional[float] = None) -> Recipe:
    """How ``method`` trains. ``value`` overrides its main setting: λ_A (AGL and its forms, ablations), λ (EWC), ρ
    (``l2``), the learning rate (``lora_lr``) or the refusal fraction (``mix``); ``budget`` sets AGL's
    ``align_budget``. ``lora`` and ``safe_lora`` (LoRA's fine-tune, projected afterwards) train with no regulariser."""
    if method == "lora_lr":
        return Recipe(lr=float(cfg.lora_lr if value is None else value))
    if method == "mix":
        return Recipe(mix=float(cfg.mix_fraction if value is None else value))
    return Recipe(method_settings(cfg, method, lam=value, budget=budget))


def method_settings(cfg: ExperimentConfig, method: str, *, lam: Optional[float] = None,
                    budget: Optional[float] = None) -> Optional[AGLConfig]:
    """The regulariser of one method as an AGLConfig (None: no regulariser; ``lora``, ``lora_lr``, ``mix`` and
    ``safe_lora``, which projects LoRA's update after training). ``lam`` overrides λ_A (AGL), λ (EWC) or ρ (L2);
    ``budget`` sets AGL's ``align_budget``. EWC is ``AGLConfig.ewc``: the Fisher penalty on the whole ΔW, every
    other term off; L2 is ``AGLConfig.l2``: ½ρ·Σ‖ΔW‖²_F, the isotropic proximal penalty (L2-SP)."""
    if method in ("lora", "safe_lora", "lora_lr", "mix"):
        return None
    if method == "l2":
        return AGLConfig.l2(float(cfg.l2_rho if lam is None else lam), backend=cfg.agl.backend)
    base = cfg.agl if lam is None else dataclasses.replace(cfg.agl, lambda_align=float(lam))
    if budget is not None:
        base = dataclasses.replace(base, align_budget=float(budget))
    if method == "agl":
        return base
    if method in ("agl_diagonal", "agl_cross"):  # AGL in either metric (agl.curvature), whatever the default
        if method == "agl_cross" and lam is None and cfg.lambda_cross is not None:
            base = dataclasses.replace(base, lambda_align=float(cfg.lambda_cross))
        return dataclasses.replace(base, curvature=method[4:])
    if method in ABLATION_CHANGES:
        change = dict(ABLATION_CHANGES[method])
        if change.get("lambda_align") == 0.0 and getattr(base, "align_budget", None) is not None:
            change["align_budget"] = None
        return dataclasses.replace(base, **change)
    if method == "ewc":
        return AGLConfig.ewc(**{k: v for k, v in agl_settings(base).items() if k not in _EWC_FIXED})
    raise ValueError(f"unknown method {method!r}")


def term_settings(cfg: ExperimentConfig, term: Optional[str] = None, weight: float = 0.0) -> AGLConfig:
    """A term-sweep point: ``cfg.agl`` with the task and collision terms off (λ_T = λ_NC = 0), then ``term`` at
    ``weight``: ``task`` sets λ_T; ``overlap`` sets λ_NC with α = 1; ``geodesic`` λ_NC with α = 0. ``term`` None:
    the sweeps' common base point (every swept term at 0)."""
    base = dataclasses.replace(cfg.agl, lambda_task=0.0, lambda_collision=0.0)
    if term is None:
        return base
    if term not in SWEEP_TERMS:
        raise ValueError(f"term_settings: unknown term {term!r}; expected one of {sorted(SWEEP_TERMS)}")
    name, fixed = SWEEP_TERMS[term]
    return dataclasses.replace(base, **{name: float(weight)}, **fixed)


# what AGLConfig.ewc fixes; EWC takes every other field (λ or budget, units, numerics) from the experiment's AGL config
_EWC_FIXED = ("subspaces", "lambda_task", "lambda_collision", "curvature")  # EWC is the diagonal baseline


def _read_file(path: str) -> Dict[str, Any]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path, "rb") as fh:
        raw = fh.read()
    if path.endswith(".toml"):
        import tomllib

        data = tomllib.loads(raw.decode())
        # allow an [experiment] table or top-level keys
        data = data.get("experiment", data)
    else:
        data = json.loads(raw.decode())
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: expected a table/object at top level")
    return data


def _merge_agl(base: AGLConfig, data: Dict[str, Any]) -> Dict[str, Any]:
    """Folds the AGL keys of ``data`` (a table ``agl`` and/or dotted keys ``agl.<field>``) into one AGLConfig.
    Weights the base left at their defaults stay unset (None), so a new ``units`` gives them its own defaults
    instead of keeping the old unit's numbers; weights set explicitly keep their values."""
    table = _unresolved(base)
    if "agl" in data:
        sub = data.pop("agl")
        if isinstance(sub, AGLConfig):
            table = _unresolved(sub)
        elif isinstance(sub, dict):
            table.update(sub)
        else:
            raise ValueError(f"`agl` must be a table of AGLConfig fields, got {type(sub).__name__}")
    for k in [k for k in data if k.startswith("agl.")]:
        table[k[4:]] = data.pop(k)
    return {**data, "agl": agl_config_from_dict(table)}


def _unresolved(c: AGLConfig) -> Dict[str, Any]:
    """``c``'s fields with default weights as None (``AGLConfig.to_dict()``), errors named as ``agl_settings``'s."""
    try:
        return c.to_dict()
    except ValueError as exc:
        raise ValueError(f"`agl`: {exc}") from None


def load_config(path: Optional[str] = None, overrides: Optional[Dict[str, Any]] = None,
                base: Optional[ExperimentConfig] = None) -> ExperimentConfig:
    """``base`` (default: the full experiment's defaults), then the file's keys, then ``overrides`` (flags; ``None``
    values are ignored). AGL fields: a table ``agl`` ([experiment.agl] in TOML) or dotted keys ``agl.lambda_align``
    (a file's table first, then dotted overrides). Unknown keys raise a ValueError naming them."""
    cfg = base or ExperimentConfig()
    data: Dict[str, Any] = {}
    if path:
        data.update(_read_file(path))
    over = {k: v for k, v in (overrides or {}).items() if v is not None}
    for table in ("agl", "sweep_terms"):  # two tables: the flags' entries win entry by entry
        if table in data and table in over:
            data[table] = {**dict(data[table]), **dict(over.pop(table))}
    data.update(over)
    names = {f.name for f in fields(ExperimentConfig)}
    unknown = sorted(k for k in set(data) - names if not k.startswith("agl."))
    if unknown:
        raise ValueError(f"unknown config key(s): {', '.join(unknown)}")
    return dataclasses.replace(cfg, **_merge_agl(cfg.agl, data))


def demo_config(**overrides) -> ExperimentConfig:
    """The small pipeline `agl demo` runs: one seed, LoRA vs AGL, an eval subset, sized for a 2-core CPU (see
    docs/EXPERIMENT.md for what each cut saves). AGL at the package defaults."""
    cfg = ExperimentConfig(
        out="runs/demo",
        seeds=[0],
        methods=["lora", "agl"],
        steps=30,
        log_every=6,  # 5 ΔL_align probes per fine-tune (was 10): each probe is ~1 training step of compute
        fisher_samples=48,
        task_test=200,  # each evaluation's task part: 2/3 of the former 300 questions (EM still with a CI)
        task_dev=100,
        task_max_new_tokens=8,
        eval_n_unsafe=48,
        eval_n_safe=24,
        eval_max_new_tokens=32,
        n_boot=500,
    )
    return load_config(None, overrides, base=cfg)
