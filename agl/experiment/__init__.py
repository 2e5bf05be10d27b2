"""``agl experiment`` / ``agl demo``: AGL's claims end to end on a real model, cached and resumable.

    from agl.experiment import ExperimentConfig, run_pipeline
    result = run_pipeline(ExperimentConfig(out="runs/exp", seeds=[0], methods=["lora", "agl"]))
    print(result["report"]["methods"]["agl"]["drift_reduction"])

    from agl.experiment import export_aligned_start          # the aligned start alone, as a plain model directory
    export_aligned_start("aligned/")                          # (= `agl align-start --out aligned/`)

Stages (see :mod:`agl.experiment.pipeline`): aligned start (LoRA SFT, merged) -> its DriftCaps evaluation ->
alignment state -> task data -> fine-tunes (LoRA, AGL, ablations, EWC; several seeds; optional λ / budget grids)
-> Safe LoRA (LoRA projected) -> evaluations (eval split; dev EM for the grids) -> law fits, predicted vs measured
ΔL_align, the frontier with dev-chosen operating points, and the report. The regulariser is one ``AGLConfig``
(``ExperimentConfig.agl``); every method is a replacement of it. Every stage's artefact carries its config hash and is reused only when the hash and checksums match.
"""
from __future__ import annotations

from agl.experiment.config import ALL_METHODS, ExperimentConfig, demo_config, load_config

__all__ = ["ALL_METHODS", "ExperimentConfig", "demo_config", "load_config", "run_pipeline", "export_aligned_start"]


def __getattr__(name):
    if name == "run_pipeline":
        from agl.experiment.pipeline import run_pipeline

        return run_pipeline
    if name == "export_aligned_start":
        from agl.experiment.export import export_aligned_start

        return export_aligned_start
    raise AttributeError(f"module 'agl.experiment' has no attribute {name!r}")
