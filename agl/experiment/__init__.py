"""``agl experiment`` / ``agl demo``: AGL's claims end to end on a real model, cached and resumable.

    from agl.experiment import ExperimentConfig, run_pipeline
    result = run_pipeline(ExperimentConfig(out="runs/exp", seeds=[0], methods=["lora", "agl"]))
    print(result["report"]["methods"]["agl"]["drift_reduction"])

Stages (see :mod:`agl.experiment.pipeline`): aligned start (LoRA SFT, merged) -> its DriftCaps evaluation ->
alignment state -> task data -> fine-tunes (LoRA, AGL, ablations, EWC; several seeds) -> evaluations -> law fits
and report. Every stage's artefact carries its config hash and is reused only when the hash and checksums match.
"""
from __future__ import annotations

from agl.experiment.config import ALL_METHODS, ExperimentConfig, demo_config, load_config

__all__ = ["ALL_METHODS", "ExperimentConfig", "demo_config", "load_config", "run_pipeline"]


def __getattr__(name):
    if name == "run_pipeline":
        from agl.experiment.pipeline import run_pipeline

        return run_pipeline
    raise AttributeError(f"module 'agl.experiment' has no attribute {name!r}")
