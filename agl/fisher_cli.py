"""``agl fisher``: estimate and save an alignment state from chat-format JSONL."""
from __future__ import annotations

import os
import re
from collections import OrderedDict

from agl.errors import CLIError

DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "fisher",
        help="estimate the alignment Fisher and subspaces of a model",
        description="Estimate the alignment state (per-layer Fisher, U, V) of a model on chat-format JSONL "
        "({\"prompt\": ..., \"response\": ...} per line) and save it as safetensors.",
    )
    p.add_argument("--model", required=True, help="model spec understood by agl.models.load_causal_lm")
    p.add_argument("--adapter", help="a peft adapter directory to load on top of the model (default: fresh LoRA)")
    p.add_argument("--data", required=True, help="chat-format JSONL file")
    p.add_argument("--out", required=True, help="output directory (or .safetensors file) for the state")
    p.add_argument("--max-samples", type=int, default=None, help="use at most N samples")
    p.add_argument("--fisher", choices=("empirical", "true"), default="empirical",
                   help="labels from the data (empirical) or sampled from the model (true)")
    p.add_argument("--target-modules", default=DEFAULT_TARGETS, help=f"LoRA target modules when no --adapter (default {DEFAULT_TARGETS})")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank of the fresh adapter (no effect on the Fisher)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--energy", type=float, default=0.9, help="subspace energy fraction (default 0.9)")
    p.add_argument("--max-rank", type=int, default=64, help="subspace rank cap (default 64)")
    p.add_argument("--fisher-dtype", choices=("float32", "bfloat16"), default="float32", help="storage dtype of F")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cross-curvature", action="store_true",
                   help="also store the per-sample gradients projected on the subspaces (a second pass), what "
                        "AGLConfig(curvature='cross') needs (docs/MATH.md §9)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _group_key(name: str) -> str:
    name = re.sub(r"^(base_model\.model\.)", "", name)
    return re.sub(r"\.\d+\.", ".*.", name)


def summarize(state) -> list:
    """One line per layer group (layers equal up to their block index)."""
    groups: "OrderedDict[str, list]" = OrderedDict()
    for name, ls in state.layers.items():
        groups.setdefault(_group_key(name), []).append(ls)
    lines = []
    for key, lss in groups.items():
        shapes = sorted({"x".join(map(str, ls.shape)) for ls in lss})
        fmean = sum(float(ls.fisher.float().mean()) for ls in lss) / len(lss)
        ru = [0 if ls.U is None else ls.U.shape[1] for ls in lss]
        rv = [0 if ls.V is None else ls.V.shape[1] for ls in lss]
        lines.append(
            f"{key}: {len(lss)} layer(s) {','.join(shapes)}  mean F {fmean:.3g}  "
            f"rank U {min(ru)}-{max(ru)}  rank V {min(rv)}-{max(rv)}"
        )
    return lines


def run(args) -> int:
    for flag, v in (("--batch-size", args.batch_size), ("--max-length", args.max_length), ("--max-rank", args.max_rank), ("--rank", args.rank)):
        if v < 1:
            raise CLIError(f"{flag} must be >= 1, got {v}")
    if args.max_samples is not None and args.max_samples < 1:
        raise CLIError(f"--max-samples must be >= 1, got {args.max_samples}")
    if not 0 < args.energy <= 1:
        raise CLIError(f"--energy must be in (0, 1], got {args.energy}")
    if args.adapter and not os.path.isdir(args.adapter):
        raise CLIError(f"--adapter {args.adapter}: not a directory")
    if os.path.isfile(args.out) and not args.out.endswith(".safetensors"):
        raise CLIError(f"--out {args.out}: is a file; give a directory or a .safetensors path")

    import torch

    from agl.data import build_chat_batches, load_jsonl
    from agl.fisher import estimate_alignment_state

    try:
        records = load_jsonl(args.data, max_records=args.max_samples)
    except ValueError as exc:
        raise CLIError(f"--data {exc}") from None
    try:
        from agl.models import load_causal_lm
    except ImportError as exc:
        raise CLIError(f"model loading is unavailable ({exc})") from None
    try:
        model, tokenizer = load_causal_lm(args.model, device=args.device, dtype=torch.float32)
    except CLIError:
        raise
    except (OSError, ValueError) as exc:
        raise CLIError(f"--model {args.model}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None

    from peft import LoraConfig, PeftModel, get_peft_model

    if args.adapter:
        try:
            model = PeftModel.from_pretrained(model, args.adapter)
        except (OSError, ValueError) as exc:
            raise CLIError(f"--adapter {args.adapter}: {str(exc).splitlines()[0]}") from None
    else:
        targets = [t.strip() for t in args.target_modules.split(",") if t.strip()]
        try:
            model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets, lora_dropout=0.0))
        except ValueError as exc:
            raise CLIError(f"--target-modules {args.target_modules}: {str(exc).splitlines()[0]}") from None
    try:
        batches = build_chat_batches(tokenizer, records, args.max_length, args.batch_size)
    except ValueError as exc:
        raise CLIError(f"--data {args.data}: {exc}") from None
    state = estimate_alignment_state(
        model, batches, fisher=args.fisher, max_samples=args.max_samples, energy=args.energy, max_rank=args.max_rank,
        progress=not args.no_progress, seed=args.seed, cross_curvature=args.cross_curvature,
    )
    state.options.update({"model": args.model, "adapter": args.adapter, "data": os.path.abspath(args.data)})
    dtype = torch.bfloat16 if args.fisher_dtype == "bfloat16" else torch.float32
    path = state.save(args.out, fisher_dtype=dtype)
    print(f"agl fisher: {len(state.layers)} layers, {state.num_samples} samples ({args.fisher} Fisher) -> {path}")
    for line in summarize(state):
        print("  " + line)
    return 0
