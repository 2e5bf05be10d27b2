"""Tiny models and data built in code for the Fisher / loss tests (nothing reaches a model hub)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def tiny_llama(seed: int = 0, dtype=torch.float32, lora: bool = True, r: int = 4, init_b: float = 0.0, targets=TARGETS):
    """LlamaForCausalLM with hidden 64, 2 layers, 4 heads (2 kv heads), vocab 128; peft LoRA on q/k/v/o."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(dtype)
    if not lora:
        return model
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), lora_dropout=0.0))
    if init_b:
        g = torch.Generator().manual_seed(seed + 1)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.data.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * init_b)
    return model


def tiny_gpt2(seed: int = 0, init_b: float = 0.05):
    """float64 GPT2LMHeadModel (n_embd 32, 1 layer, vocab 64) with peft LoRA r = 2 on ``c_attn``, a Conv1D whose
    weight is stored (in, out): ``fan_in_fan_out=True``; B drawn N(0, init_b²) so ΔW ≠ 0."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    base = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)).double()
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, init_b)
    return model


def tiny_batches(n_samples: int = 6, batch_size: int = 3, T: int = 12, seed: int = 0, vocab: int = 128):
    """Batches with a prompt (labels -100) of varying length, a response, and right padding."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in range(0, n_samples, batch_size):
        b = min(batch_size, n_samples - s)
        ids = torch.randint(1, vocab, (b, T), generator=g)
        mask = torch.ones(b, T, dtype=torch.long)
        labels = ids.clone()
        for i in range(b):
            p = 2 + (s + i) % 4
            L = T - (s + i) % 3
            labels[i, :p] = -100
            mask[i, L:] = 0
            labels[i, L:] = -100
            ids[i, L:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def train_trace(config, steps: int = 80, lr: float = 1e-2):
    """(align_nats, lambda_align) after each of ``steps`` AdamW steps of task loss + ``AGLLoss(config)`` on the tiny
    Llama (state from 6 random-token samples, training on 16 others): the budget controller's test and bench."""
    from agl.fisher import estimate_alignment_state
    from agl.loss import AGLLoss

    torch.manual_seed(0)
    model = tiny_llama()
    reg = AGLLoss(model, estimate_alignment_state(model, tiny_batches(6, 3), progress=False), config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    data = tiny_batches(16, 4, seed=3)
    out = []
    for step in range(steps):
        reg(model(**data[step % len(data)]).loss).backward()
        opt.step()
        opt.zero_grad()
        out.append((reg.last_terms["align_nats"], reg.last_terms["lambda_align"]))
    return out
