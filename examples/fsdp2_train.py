"""LoRA fine-tuning with the AGL regulariser under FSDP2, the Fisher sharded by rows. Runs with torchrun or accelerate:

    torchrun --nproc_per_node 2 examples/fsdp2_train.py --out /tmp/agl_fsdp2          # CPU: gloo; GPUs: nccl
    accelerate launch --config_file examples/accelerate_fsdp2.yaml examples/fsdp2_train.py --out /tmp/agl_fsdp2

The model here is a small Llama built in code (nothing downloaded) so the script runs anywhere; swap in your own
``AutoModelForCausalLM.from_pretrained`` + peft model and your data. Steps: shard the peft model (``fully_shard`` per
decoder layer, then the root; accelerate does the same from its config), estimate the alignment state on the sharded
model (each rank keeps its rows of every Fisher), save it sharded, load it again (any world size), train.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist


def build_model():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)
    return get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=8, lora_alpha=16,
                                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))


def batches(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 256, (4, 32), generator=g)
        labels = ids.clone()
        labels[:, :8] = -100  # the prompt carries no loss
        out.append({"input_ids": ids, "labels": labels})
    return out


def main():
    import agl

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="directory for the sharded alignment state")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--accelerate", action="store_true", help="shard through accelerate (set by the yaml's launcher)")
    args = ap.parse_args()
    use_accelerate = args.accelerate or "ACCELERATE_DYNAMO_BACKEND" in os.environ or "ACCELERATE_USE_FSDP" in os.environ

    model = build_model()
    if use_accelerate:
        from accelerate import Accelerator

        accelerator = Accelerator()
        model = accelerator.prepare(model)  # applies fully_shard per decoder layer + root (fsdp_version: 2)
        device = accelerator.device
    else:
        from torch.distributed.fsdp import fully_shard

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        model.to(device)
        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    rank, world = dist.get_rank(), dist.get_world_size()

    # 1. the alignment state of the (here: untrained) aligned model, kept by rows, saved one file per rank
    state = agl.estimate_alignment_state(model, batches(4, seed=1), progress=rank == 0)
    state.save(args.out)
    state = agl.ShardedAlignmentState.load(args.out)  # any world size reads it; one process gets the whole state

    # 2. train with the regulariser: same call as on one GPU
    agl_loss = agl.AGLLoss(model, state)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for step, batch in enumerate(batches(args.steps, seed=100 + rank)):
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = agl_loss(model(**batch).loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if rank == 0:
            t = agl_loss.last_terms
            print(f"step {step}: loss {t['total']:.4f}  align_nats {t['align_nats']:.3e}  "
                  f"Fisher rows held {state.fisher_bytes() / 2**20:.2f} MiB of {world} shards", flush=True)
    dist.barrier()
    if not use_accelerate:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
