"""Shared helpers of the experiment: model loading, chat batches, greedy generation, held-out loss, JSONL caches."""
from __future__ import annotations

import json
import random
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from agl._io import read_jsonl, write_jsonl

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


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int, device,
             progress: bool = False, desc: str = "generate", cache: Optional[str] = None) -> List[Dict[str, object]]:
    """Greedy chat completions of ``prompts``, batched with left padding. Returns ``{"response", "finished"}`` per
    prompt (``finished``: the model ended its turn within ``max_new_tokens``). With ``cache`` (a JSONL path),
    completions are appended as they finish and reused on the next call, so an interrupted run loses nothing."""
    from tqdm.auto import tqdm

    _ensure_pad(tokenizer)
    done: Dict[str, dict] = {}
    if cache:
        for r in read_jsonl(cache, missing_ok=True, tolerate_torn_tail=True):
            done[r["prompt"]] = r
        # rewritten without a torn last line, so the appends below start on a line of their own
        write_jsonl(cache, list(done.values()))
    todo = [p for p in dict.fromkeys(prompts) if p not in done]
    todo.sort(key=len)  # similar lengths together: less padding
    was_training = model.training
    model.eval()
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    eos_ids = {tokenizer.eos_token_id}
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    if im_end is not None:
        eos_ids.add(im_end)
    eos_ids.discard(None)
    fh = open(cache, "a", encoding="utf-8") if cache else None
    try:
        bar = tqdm(total=len(todo), desc=desc, disable=not progress, leave=False, unit="prompt")
        for i in range(0, len(todo), batch_size):
            chunk = todo[i: i + batch_size]
            ids = [_chat_ids(tokenizer, p)[0] for p in chunk]
            T = max(len(x) for x in ids)
            input_ids = torch.full((len(ids), T), tokenizer.pad_token_id, dtype=torch.long)
            attn = torch.zeros((len(ids), T), dtype=torch.long)
            for j, x in enumerate(ids):
                input_ids[j, T - len(x):] = torch.tensor(x)
                attn[j, T - len(x):] = 1
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attn.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=sorted(eos_ids) or None)
            for j, p in enumerate(chunk):
                gen = out[j, T:].tolist()
                finished = any(t in eos_ids for t in gen)
                text = tokenizer.decode(gen, skip_special_tokens=True).strip()
                rec = {"prompt": p, "response": text, "finished": bool(finished)}
                done[p] = rec
                if fh:
                    fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            if fh:
                fh.flush()
            bar.update(len(chunk))
        bar.close()
    finally:
        if fh:
            fh.close()
        tokenizer.padding_side = old_side
        if was_training:
            model.train()
    return [done[p] for p in prompts]
