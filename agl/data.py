"""Chat-format data: JSONL records ``{"prompt": ..., "response": ...}`` -> causal-LM batches with prompt masking.

``build_chat_batches(tokenizer, records, max_length, batch_size)`` returns a list of dicts with ``input_ids``,
``attention_mask`` (b, T) and ``labels`` (b, T; -100 on prompt and pad tokens, so only response tokens carry loss),
right-padded to the longest sample of each batch. The prompt is rendered with the tokenizer's chat template when it
has one (a user turn plus the generation prompt), else as ``prompt + "\\n"``; the response is followed by EOS.
Used by ``agl fisher`` and by the experiment scripts.
"""
from __future__ import annotations

import os
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import torch
from torch import Tensor

from agl._io import iter_jsonl

__all__ = ["load_jsonl", "tokenize_chat", "build_chat_batches"]


def load_jsonl(path: str, keys: Sequence[str] = ("prompt", "response"), max_records: Optional[int] = None) -> List[dict]:
    """Read a JSONL file of objects having string ``keys``. Raises ``ValueError`` naming the file and line of the
    first bad record (invalid JSON, not an object, missing or non-string key) or when the file holds no record."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    records = []
    for lineno, rec in iter_jsonl(path):
        for k in keys:
            if not isinstance(rec.get(k), str):
                raise ValueError(f"{path}:{lineno}: missing string field {k!r} (need {list(keys)})")
        records.append(rec)
        if max_records is not None and len(records) >= max_records:
            break
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def _prompt_text(tokenizer, prompt: str) -> tuple:
    """(text, add_special_tokens) for the prompt part."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        return text, False  # the template writes its own special tokens
    return prompt + "\n", True


def tokenize_chat(tokenizer, prompt: str, response: str, max_length: int) -> Optional[Dict[str, List[int]]]:
    """One record -> ``{"input_ids", "labels"}`` lists (labels -100 on the prompt), truncated to ``max_length``
    (the prompt is cut from the left first, keeping at least half the budget for the response). None when no
    response token fits."""
    text, special = _prompt_text(tokenizer, prompt)
    p_ids = list(tokenizer(text, add_special_tokens=special)["input_ids"])
    r_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        r_ids.append(int(tokenizer.eos_token_id))
    if len(p_ids) + len(r_ids) > max_length:
        keep_p = min(len(p_ids), max(max_length - len(r_ids), max_length // 2))
        p_ids = p_ids[len(p_ids) - keep_p:] if keep_p else []
        r_ids = r_ids[: max_length - len(p_ids)]
    if not r_ids:
        return None
    return {"input_ids": p_ids + r_ids, "labels": [-100] * len(p_ids) + r_ids}


def build_chat_batches(
    tokenizer,
    records: Iterable[Mapping[str, str]],
    max_length: int = 512,
    batch_size: int = 8,
    *,
    prompt_key: str = "prompt",
    response_key: str = "response",
) -> List[Dict[str, Tensor]]:
    """Tokenise chat records into right-padded batches; see the module docstring. Records whose response does not
    fit are skipped. Raises ``ValueError`` when nothing is left."""
    if max_length < 2 or batch_size < 1:
        raise ValueError(f"build_chat_batches: need max_length >= 2 and batch_size >= 1, got {max_length}, {batch_size}")
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    samples = []
    for rec in records:
        s = tokenize_chat(tokenizer, rec[prompt_key], rec[response_key], max_length)
        if s is not None:
            samples.append(s)
    if not samples:
        raise ValueError("build_chat_batches: no record has a response token within max_length")
    batches = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        T = max(len(s["input_ids"]) for s in chunk)
        ids = torch.full((len(chunk), T), int(pad), dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        labels = torch.full((len(chunk), T), -100, dtype=torch.long)
        for j, s in enumerate(chunk):
            L = len(s["input_ids"])
            ids[j, :L] = torch.tensor(s["input_ids"])
            mask[j, :L] = 1
            labels[j, :L] = torch.tensor(s["labels"])
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches
