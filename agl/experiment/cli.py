"""``agl experiment``: the full pipeline (config file and/or flags), cached and resumable."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

__all__ = ["register", "add_common_options", "config_from_args", "print_summary"]


def _csv(kind):
    def parse(text):
        try:
            return [kind(x) for x in text.replace(",", " ").split()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}")

    return parse


def _set_value(text):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    try:
        v = json.loads(v)
    except ValueError:
        pass  # a bare string
    return k.strip().replace("-", "_"), v


def _sweep_term(text):
    """``TERM=W,W,...`` -> (term, [weights]); the term's name and the weights' signs are checked by the config."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--sweep-term expects TERM=W,W,... (TERM: task, overlap or geodesic), "
                                         f"got {text!r}")
    term, ws = text.split("=", 1)
    return term.strip(), _csv(float)(ws)


def add_common_options(p: argparse.ArgumentParser) -> None:
    from agl.experiment.config import ALL_METHODS

    p.add_argument("--config", metavar="FILE", help="JSON or TOML config file (keys = ExperimentConfig fields; "
                   "TOML may put them under [experiment], the AGL fields under [experiment.agl]); flags override it")
    p.add_argument("--out", metavar="DIR", help="output directory (artefacts, caches, report)")
    p.add_argument("--model", metavar="SPEC", help="model: 'smollm2-135m-instruct' (offline default), a local HF "
                   "directory or a .gguf file")
    p.add_argument("--device", choices=["cpu", "cuda"], help="where to train and generate (cuda: same run, fast)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="model dtype (default float32)")
    p.add_argument("--seeds", type=_csv(int), metavar="S,S,...", help="fine-tune seeds")
    p.add_argument("--ablation-seeds", type=_csv(int), dest="ablation_seeds", metavar="S,S,...",
                   help="seeds for the five ablations only (default: --seeds)")
    p.add_argument("--methods", type=_csv(str), metavar="M,M,...", help="methods: " + ", ".join(ALL_METHODS))
    p.add_argument("--steps", type=int, metavar="N", help="fine-tune steps per run")
    p.add_argument("--lr", type=float, help="fine-tune learning rate")
    p.add_argument("--lambda-align", type=float, dest="lambda_align",
                   help="λ_A of AGL and λ of EWC (= --set agl.lambda_align=...; any AGLConfig field: --set agl.FIELD=V)")
    p.add_argument("--align-budget", type=float, dest="align_budget",
                   help="AGL's budget mode: predicted alignment-loss rise allowed, nats (= --set agl.align_budget=...)")
    p.add_argument("--sweep-agl", type=_csv(float), dest="sweep_agl", metavar="L,L,...",
                   help="λ_A grid for AGL's frontier (trained on --sweep-seeds, dev EM + eval numbers)")
    p.add_argument("--sweep-budget", type=_csv(float), dest="sweep_budget", metavar="E,E,...",
                   help="align_budget grid (nats) for AGL's frontier")
    p.add_argument("--sweep-ewc", type=_csv(float), dest="sweep_ewc", metavar="L,L,...", help="EWC λ grid")
    p.add_argument("--sweep-lr", type=_csv(float), dest="sweep_lr", metavar="LR,LR,...",
                   help="learning-rate grid of plain LoRA (method lora_lr)")
    p.add_argument("--sweep-l2", type=_csv(float), dest="sweep_l2", metavar="R,R,...", help="L2-SP ρ grid")
    p.add_argument("--sweep-mix", type=_csv(float), dest="sweep_mix", metavar="P,P,...",
                   help="safety-data mixing grid: fractions of the fine-tune's examples that are refusal demos")
    p.add_argument("--sweep-term", type=_sweep_term, action="append", dest="sweep_term", metavar="TERM=W,W,...",
                   help="weights to sweep for one extra AGL term (task, overlap or geodesic), the others off; dev "
                        "data only, never evaluated; repeatable (= sweep_terms in a config file)")
    p.add_argument("--sweep-seeds", type=_csv(int), dest="sweep_seeds", metavar="S,S,...",
                   help="seeds of the grids (default: --seeds)")
    p.add_argument("--threads", type=int, help="torch CPU threads (0: torch's default)")
    p.add_argument("--set", type=_set_value, action="append", default=[], metavar="KEY=VALUE",
                   help="any other config field (JSON value), e.g. --set eval_n_unsafe=64; repeatable")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


_FLAG_FIELDS = ("out", "model", "device", "dtype", "seeds", "ablation_seeds", "methods", "steps", "lr",
                "sweep_agl", "sweep_budget", "sweep_ewc", "sweep_lr", "sweep_l2", "sweep_mix", "sweep_seeds",
                "threads")
_AGL_FLAGS = ("lambda_align", "align_budget")  # flags that set a field of the embedded AGLConfig


def config_from_args(args, base=None):
    from agl.errors import CLIError
    from agl.experiment.config import load_config

    overrides = {k: getattr(args, k) for k in _FLAG_FIELDS if getattr(args, k, None) is not None}
    overrides.update({f"agl.{k}": getattr(args, k) for k in _AGL_FLAGS if getattr(args, k, None) is not None})
    for term, ws in getattr(args, "sweep_term", None) or []:  # a repeated term adds weights
        overrides.setdefault("sweep_terms", {}).setdefault(term, []).extend(ws)
    overrides.update(dict(args.set))
    try:
        return load_config(args.config, overrides, base=base)
    except (ValueError, FileNotFoundError, TypeError) as exc:
        raise CLIError(str(exc).splitlines()[0]) from None


def print_summary(result: dict, file=sys.stdout) -> None:
    from agl.experiment.report import markdown_table

    rep = result["report"]
    a = rep["aligned_start"]

    def pct(x):
        return "–" if x is None else f"{100 * x:.1f}%"

    print("", file=file)
    print(f"Aligned start: RR_unsafe {pct(a['rr_unsafe'])}, over-refusal {pct(a['over_refusal'])}, "
          f"task EM {pct(a['task_em'])}", file=file)
    print(markdown_table(rep), file=file)
    F = rep.get("frontier") or {}
    for b, e in (F.get("pairwise") or {}).items():  # AGL's frontier at each baseline's dev-chosen point
        if e["error"] is None:
            rr, c = e["rr"], e["compliance"]
            print(f"AGL vs {b} at its point {e['operating_point']}: RR_unsafe-after gain {pct(rr['gain'])} "
                  f"[{pct(rr['ci95'][0])}, {pct(rr['ci95'][1])}], p = {rr['p_value']}; compliance gain "
                  f"{pct(c['gain'])} [{pct(c['ci95'][0])}, {pct(c['ci95'][1])}]", file=file)
        else:
            print(f"AGL vs {b}: not computed ({e['error']})", file=file)
    for t, e in ((rep.get("term_sweeps") or {}).get("terms") or {}).items():
        print(f"Term sweep {t} (dev data, rule 7): " + (f"weight {e['chosen']:g}" if e["helps"] else "does not help (0)"),
              file=file)
    from agl.experiment.report import goal_line

    for k, v in rep.get("goals", {}).items():
        print(" " + goal_line(k, v), file=file)
    built = [n for n, s in result["stages"].items() if s["built"]]
    print(f"\n{len(built)} stage(s) built, {len(result['stages']) - len(built)} cached; "
          f"total {result['seconds'] / 60:.1f} min. Report: {os.path.join(result['out'], 'report')}/", file=file)


def _user_errors() -> tuple:
    """Errors caused by the input (a missing file, a model or prompt set that cannot be loaded): one line, no
    traceback. Anything else is a bug and keeps its traceback."""
    errs = [FileNotFoundError, PermissionError]
    try:
        from agl.models import ModelLoadError

        errs.append(ModelLoadError)
    except ImportError:
        pass
    try:
        from agl.driftcaps.prompts import PromptFormatError

        errs.append(PromptFormatError)
    except ImportError:
        pass
    return tuple(errs)


def run_from_args(args, base=None, banner: str = "") -> int:
    """Shared body of `agl experiment` and `agl demo`: build the config (flags over ``base``), run, summarise."""
    from agl.errors import CLIError
    from agl.experiment.pipeline import run_pipeline

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    cfg = config_from_args(args, base=base)
    if cfg.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise CLIError("--device cuda: no CUDA GPU is visible to torch")
    if banner:
        print(banner.format(cfg=cfg), flush=True)
    try:
        result = run_pipeline(cfg, progress=not args.no_progress)
    except _user_errors() as exc:
        raise CLIError(str(exc).splitlines()[0]) from None
    print_summary(result)
    return 0


def _run(args) -> int:
    return run_from_args(args)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "experiment", help="the full AGL experiment: aligned start, fine-tunes, ablations, EWC, law fits, report",
        description="Runs (or resumes) the whole pipeline: aligned start -> alignment state -> task fine-tunes for "
                    "every method and seed -> DriftCaps and task evaluation -> forgetting-law fits -> report "
                    "(JSON, Markdown, PNG) under --out. Every stage is cached by config hash; re-run the same "
                    "command after an interruption to continue.")
    add_common_options(p)
    p.set_defaults(func=_run)
