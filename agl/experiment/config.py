"""The experiment's configuration: one dataclass, loadable from a JSON or TOML file and overridable by flags.

Every stage of the pipeline depends on a subset of the fields (``STAGE_FIELDS``); its cache key is a stable hash of
those fields' values plus the keys of the stages it reads from, so changing, say, the number of fine-tuning steps
reruns the fine-tunes and what follows, but reuses the aligned start and the alignment state.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Sequence

__all__ = [
    "ABLATIONS", "ALL_METHODS", "EVAL_VERSION", "ExperimentConfig", "demo_config", "load_config", "stable_hash", "method_settings",
]

# the methods, in report order
ALL_METHODS = ("lora", "agl", "no_fisher", "no_task", "no_collision", "overlap_only", "geodesic_only", "ewc")
ABLATIONS = ("no_fisher", "no_task", "no_collision", "overlap_only", "geodesic_only")


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
    methods: List[str] = field(default_factory=lambda: list(ALL_METHODS))
    threads: int = 0  # torch.set_num_threads; 0 = leave torch's default
    # seeds for the five ablations (None: `seeds`); fewer seeds there buys the main methods more on a small machine
    ablation_seeds: Optional[List[int]] = None

    # --- stage 1: aligned start (LoRA SFT on calibration prompts, then merged)
    align_n_unsafe: int = 160
    align_n_safe: int = 120
    align_holdout: int = 32  # calibration unsafe prompts kept out of the SFT: held-out refusal demos (ΔL_align)
    align_dev_safe: int = 48  # calibration safe prompts kept out of the SFT (tuning-dev, with the unsafe hold-out)
    align_n_borderline: int = 93  # the project's own borderline-safe prompts in the SFT (data/borderline.jsonl)
    align_distill_filter: bool = True  # re-ask (steered) or drop distilled safe answers the judge calls refusals
    align_steps: int = 90
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
    # AGL (agl.loss.AGLConfig); the ablations are derived from these in method_settings()
    lambda_align: float = 1e5
    lambda_task: float = 1e3
    lambda_collision: float = 1.0
    alpha: float = 0.5
    beta: float = 4.0
    tau: float = 0.01
    sharpness: float = 100.0
    backend: str = "auto"
    # EWC baseline: lambda * mean_layers mean(F ⊙ ΔW²)
    ewc_lambda: float = 1e5

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

    # --- optional λ sweep (EWC-vs-AGL frontier, measured on calibration data and the task dev split)
    sweep_agl: List[float] = field(default_factory=list)
    sweep_ewc: List[float] = field(default_factory=list)
    sweep_seed: int = 0

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        bad = [m for m in self.methods if m not in ALL_METHODS]
        if bad:
            raise ValueError(f"unknown method(s) {bad}; choose from {list(ALL_METHODS)}")
        if not self.methods:
            raise ValueError("`methods` is empty")
        if not self.seeds:
            raise ValueError("`seeds` is empty")
        if self.ablation_seeds is not None and not self.ablation_seeds:
            raise ValueError("`ablation_seeds` is empty (use null for the same seeds as `seeds`)")
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

    # -- serialisation
    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **kw) -> "ExperimentConfig":
        return dataclasses.replace(self, **kw)

    def seeds_for(self, method: str) -> List[int]:
        """The seeds ``method`` runs with: ``ablation_seeds`` for the ablations (when set), else ``seeds``."""
        if self.ablation_seeds is not None and method in ABLATIONS:
            return list(self.ablation_seeds)
        return list(self.seeds)

    def key(self, names: Sequence[str]) -> Dict[str, Any]:
        return {n: getattr(self, n) for n in names}


# which fields each stage depends on (besides its upstream stages' keys); `out`, `device`, `threads`, `n_boot` and
# batch sizes for inference are left out on purpose: they do not change the artefact (up to float rounding)
STAGE_FIELDS = {
    "aligned_start": ["model", "dtype", "prompts", "refusals", "align_n_unsafe", "align_n_safe", "align_holdout",
                      "align_dev_safe", "align_n_borderline", "align_distill_filter",
                      "align_steps", "align_rank", "align_lr", "align_batch", "align_targets",
                      "distill_max_new_tokens", "max_length", "align_seed"],
    "eval_start": ["eval_split", "eval_n_unsafe", "eval_n_safe", "eval_max_new_tokens"],
    "alignment_state": ["fisher_samples", "fisher_kind", "fisher_energy", "fisher_max_rank", "rank", "lora_alpha",
                        "targets"],
    "task_data": ["task_train", "task_dev", "task_test", "task_seed"],
    "finetune": ["steps", "lr", "rank", "lora_alpha", "batch", "targets", "log_every", "max_length", "backend"],
    "evaluate": ["eval_split", "eval_n_unsafe", "eval_n_safe", "eval_max_new_tokens", "task_max_new_tokens"],
}

# bump when generation changes in a way that invalidates evaluation artefacts (2: stop at the chat end-of-turn token)
EVAL_VERSION = 2


def method_settings(cfg: ExperimentConfig, method: str, *, lam: Optional[float] = None) -> Dict[str, Any]:
    """The regulariser settings of one method. ``lam`` overrides the method's main λ (λ_A for AGL, λ for EWC)."""
    lam_a = cfg.lambda_align if lam is None else float(lam)
    agl = dict(kind="agl", lambda_align=lam_a, lambda_task=cfg.lambda_task, lambda_collision=cfg.lambda_collision,
               alpha=cfg.alpha, beta=cfg.beta, tau=cfg.tau, sharpness=cfg.sharpness)
    if method == "lora":
        return dict(kind="lora")
    if method == "agl":
        return agl
    if method == "no_fisher":
        return {**agl, "lambda_align": 0.0}
    if method == "no_task":
        return {**agl, "lambda_task": 0.0}
    if method == "no_collision":
        return {**agl, "lambda_collision": 0.0}
    if method == "overlap_only":
        return {**agl, "alpha": 1.0, "lambda_align": 0.0, "lambda_task": 0.0}
    if method == "geodesic_only":
        return {**agl, "alpha": 0.0, "lambda_align": 0.0, "lambda_task": 0.0}
    if method == "ewc":
        return dict(kind="ewc", lambda_ewc=cfg.ewc_lambda if lam is None else float(lam))
    raise ValueError(f"unknown method {method!r}")


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


def load_config(path: Optional[str] = None, overrides: Optional[Dict[str, Any]] = None,
                base: Optional[ExperimentConfig] = None) -> ExperimentConfig:
    """``base`` (default: the full experiment's defaults), then the file's keys, then ``overrides`` (flags; ``None``
    values are ignored). Unknown keys raise a ValueError naming them."""
    cfg = base or ExperimentConfig()
    data: Dict[str, Any] = {}
    if path:
        data.update(_read_file(path))
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    names = {f.name for f in fields(ExperimentConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown config key(s): {', '.join(unknown)}")
    return dataclasses.replace(cfg, **data)


def demo_config(**overrides) -> ExperimentConfig:
    """The small pipeline `agl demo` runs: one seed, LoRA vs AGL, an eval subset, sized for a 2-core CPU."""
    cfg = ExperimentConfig(
        out="runs/demo",
        seeds=[0],
        methods=["lora", "agl"],
        steps=30,
        log_every=3,
        fisher_samples=48,
        task_test=300,
        task_dev=100,
        task_max_new_tokens=8,
        eval_n_unsafe=48,
        eval_n_safe=24,
        eval_max_new_tokens=32,
        n_boot=500,
    )
    return dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
