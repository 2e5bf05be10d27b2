"""Shared helpers of the experiment: model loading, chat batches, greedy generation (through the DriftCaps harness),
held-out loss."""
from __future__ import annotations

import random
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

__all__ = [
    "ModelFactory", "default_model_factory", "chat_batches", "generate", "mean_nll",
    "torch_dtype", "lora_config", "set_seed",
]

# (spec, device, dtype) -> (model, tokenizer)
ModelFactory = Callable[[str, str, torch.dtype], Tuple[torch.nn.Module, object]]


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def default_model_factory(spec: str, device: str, dtype: torch.dtype):
    from agl.models import load_causal_lm

    return load_causal_lm(spec, device=device, dtype=dtype)


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def lora_config(rank: int, alpha: int, targets, seed_dropout: float = 0.0):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=seed_dropout, target_modules=targets, bias="none",
                      task_type="CAUSAL_LM")


def _ensure_pad(tokenizer) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def _chat_ids(tokenizer, prompt: str, response: Optional[str] = None) -> Tuple[List[int], int]:
    """Token ids of one chat exchange and the length of its prompt part (generation prompt included)."""
    msgs = [{"role": "user", "content": prompt}]
    p_ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    if hasattr(p_ids, "keys"):  # newer transformers may return a BatchEncoding
        p_ids = p_ids["input_ids"]
    p_ids = list(p_ids)
    if response is None:
        return p_ids, len(p_ids)
    full = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": response}], tokenize=True)
    if hasattr(full, "keys"):
        full = full["input_ids"]
    full = list(full)
    if full[: len(p_ids)] != p_ids:  # template renders the assistant turn differently: fall back to concatenation
        eos = tokenizer.eos_token_id
        full = p_ids + tokenizer.encode(response, add_special_tokens=False) + ([eos] if eos is not None else [])
    return full, len(p_ids)


def chat_batches(tokenizer, records: Sequence[dict], max_length: int, batch_size: int) -> List[Dict[str, torch.Tensor]]:
    """Batches for a causal LM from ``{"prompt", "response"}`` records: ``input_ids``, ``attention_mask`` and
    ``labels`` (-100 on prompt and pad tokens). Uses ``agl.data.build_chat_batches`` when present."""
    try:
        from agl.data import build_chat_batches
    except ImportError:
        build_chat_batches = None
    if build_chat_batches is not None:
        return list(build_chat_batches(tokenizer, list(records), max_length=max_length, batch_size=batch_size))
    _ensure_pad(tokenizer)
    out = []
    for i in range(0, len(records), batch_size):
        chunk = records[i: i + batch_size]
        seqs = []
        for r in chunk:
            ids, n_p = _chat_ids(tokenizer, r["prompt"], r["response"])
            ids = ids[:max_length]
            labels = [-100] * min(n_p, len(ids)) + ids[n_p:]
            seqs.append((ids, labels))
        T = max(len(s[0]) for s in seqs)
        pad = tokenizer.pad_token_id
        input_ids = torch.full((len(seqs), T), pad, dtype=torch.long)
        attn = torch.zeros((len(seqs), T), dtype=torch.long)
        labels = torch.full((len(seqs), T), -100, dtype=torch.long)
        for j, (ids, lab) in enumerate(seqs):  # right padding for training
            input_ids[j, : len(ids)] = torch.tensor(ids)
            attn[j, : len(ids)] = 1
            labels[j, : len(lab)] = torch.tensor(lab)
        out.append({"input_ids": input_ids, "attention_mask": attn, "labels": labels})
    return out


def to_device(batch: Dict[str, torch.Tensor], device) -> Dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def mean_nll(model, batches: Sequence[Dict[str, torch.Tensor]], device) -> float:
    """Mean per-token negative log-likelihood of the labelled tokens over ``batches`` (token-weighted)."""
    was_training = model.training
    model.eval()
    tot, n = 0.0, 0
    for b in batches:
        b = to_device(b, device)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
        tgt = b["labels"][:, 1:]
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                               ignore_index=-100, reduction="sum")
        tot += float(ce)
        n += int((tgt != -100).sum())
    if was_training:
        model.train()
    return tot / max(n, 1)


def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int, device=None,
             progress: bool = False, desc: str = "generate", cache: Optional[str] = None) -> List[Dict[str, object]]:
    """Greedy chat completions of ``prompts`` through the DriftCaps harness (``agl.driftcaps.harness.evaluate``:
    batched, left-padded, resumable JSONL ``cache``), without judging. Returns ``{"response", "finished"}`` per
    prompt; ``finished``: the completion is shorter than ``max_new_tokens`` tokens, i.e. the model ended its turn
    (re-tokenised, so a completion cut exactly at the limit can rarely read as finished). ``device``: unused, the
    model's own device is used (kept for the callers' signature)."""
    from agl.driftcaps.harness import evaluate

    unique = list(dict.fromkeys(prompts))
    recs = [{"id": f"q{i:06d}", "prompt": p, "label": "safe", "category": desc, "split": "eval"}
            for i, p in enumerate(unique)]
    rep = evaluate(model, tokenizer, recs, max_new_tokens=max_new_tokens, batch_size=batch_size,
                   judge=_no_judge, cache=cache, progress=progress)
    by_prompt = {}
    for r in rep.records:
        n_tok = len(tokenizer(r["response"], add_special_tokens=False)["input_ids"])
        by_prompt[r["prompt"]] = {"response": r["response"], "finished": n_tok < max_new_tokens}
    return [dict(by_prompt[p], prompt=p) for p in prompts]


def _no_judge(prompt: str, response: str) -> bool:
    """Generation only: the harness's judge slot, never read."""
    return False
