"""Per-sample passes over alignment data: the forward/backward loop every per-sample-gradient estimator shares.

The estimators (``agl.fisher``: the diagonal Fisher and the subspaces; ``agl.curvature``: the projected per-sample
gradients) hook the target layers and read δ (the gradient of a layer's output) and x (its input) per sample; this
module runs the passes that feed those hooks: samples split across ranks by global index, the model frozen and in
eval mode, one backward of Σ_i (sample i's summed token loss) per batch, with the data's labels or labels sampled
from the model (the "true" Fisher), and the labelled tokens counted.
"""
from __future__ import annotations

import functools
from typing import Callable, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as Fn
from torch import Tensor, nn

__all__ = ["per_sample_losses", "backward_summed_losses", "hooked_passes", "hook_layer_gradients"]

def per_sample_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """Summed next-token cross-entropy of each sample: ``logits`` (b, T, V), ``labels`` (b, T) with -100 ignored
    -> (b,). Position t predicts ``labels[:, t + 1]``, as Hugging Face causal LMs do."""
    logits = logits[:, :-1]
    if logits.dtype != torch.float64:
        logits = logits.float()
    target = labels[:, 1:].to(logits.device)
    ce = Fn.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="none")
    return ce.view(target.shape).sum(dim=1)


def _labelled_tokens(labels: Tensor) -> int:
    """Tokens that carry a loss in :func:`per_sample_losses` (targets ``labels[:, 1:]`` that are not -100)."""
    return int((labels[:, 1:] != -100).sum())


def _sample_true_labels(logits: Tensor, labels: Tensor, sample_ids: Sequence[int], seed: int) -> Tensor:
    """Labels drawn from the model's own next-token distribution wherever ``labels`` is not -100 (the response).
    Each sample uses its own generator seeded by its global index, so the draw does not depend on batching or rank."""
    out = torch.full_like(labels, -100)
    with torch.no_grad():
        for row, sid in enumerate(sample_ids):
            pos = (labels[row, 1:] != -100).nonzero().flatten()
            if pos.numel() == 0:
                continue
            probs = torch.softmax(logits[row, pos].float(), dim=-1)
            gen = torch.Generator(device=probs.device).manual_seed(int(seed) * 1_000_003 + int(sid))
            draw = torch.multinomial(probs, 1, generator=gen).flatten()
            out[row, pos + 1] = draw.to(out.dtype)
    return out


def _compute_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return torch.float64 if p.dtype == torch.float64 else torch.float32
    return torch.float32


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _dist_info():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist, dist.get_rank(), dist.get_world_size()
    return None, 0, 1


def _iter_samples(batches: Iterable[Mapping[str, Tensor]], max_samples: Optional[int], rank: int, world: int,
                  pad_empty: bool = False):
    """Yield (this rank's sub-batch or None, its global sample ids, samples in the batch) with at most
    ``max_samples`` samples in all. ``pad_empty`` (FSDP2, where every rank must run every forward): a rank without
    samples in a batch gets the batch's first sample with every label -100 (no loss, zero gradients) and no id."""
    seen = 0
    for batch in batches:
        if max_samples is not None and seen >= max_samples:
            break
        if "input_ids" not in batch:
            raise ValueError(f"agl: each batch must be a dict with `input_ids` (and `attention_mask`, `labels`); got keys {sorted(batch)}")
        b = batch["input_ids"].shape[0]
        take = b if max_samples is None else min(b, max_samples - seen)
        ids = torch.arange(seen, seen + take)
        seen += take
        keep = (ids % world == rank).nonzero().flatten()
        if keep.numel() == 0 and pad_empty:
            pad = {k: (v[:1] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == b else v) for k, v in batch.items()}
            pad["labels"] = torch.full_like(pad["input_ids"], -100)
            yield pad, [], take
            continue
        if keep.numel() == 0:
            yield None, [], take
            continue
        sub = {k: (v[:take][keep.to(v.device)] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == b else v)
               for k, v in batch.items()}
        yield sub, ids[keep].tolist(), take


def _labels_of(batch: Mapping[str, Tensor]) -> Tensor:
    labels = batch.get("labels")
    if labels is None:
        labels = batch["input_ids"].clone()
        if batch.get("attention_mask") is not None:
            labels[batch["attention_mask"] == 0] = -100
    return labels


def _forward_logits(model: nn.Module, batch: Mapping[str, Tensor], device) -> Tensor:
    kwargs = {"input_ids": batch["input_ids"].to(device)}
    if batch.get("attention_mask") is not None:
        kwargs["attention_mask"] = batch["attention_mask"].to(device)
    out = model(**kwargs, use_cache=False)
    return out.logits if hasattr(out, "logits") else out[0]


def backward_summed_losses(net: nn.Module, sub: Mapping[str, Tensor], ids: Sequence[int], device, fisher: str,
                           seed: int):
    """One forward of the sub-batch and a backward of Σ_i (sample i's summed token loss), with the data's labels
    (``fisher="empirical"``) or labels drawn from the model (``"true"``, seeded per sample id): what the hooks
    of every per-sample-gradient estimator see. Returns (labels used, whether a backward ran)."""
    labels = _labels_of(sub).to(device)
    logits = _forward_logits(net, sub, device)
    if fisher == "true":
        labels = _sample_true_labels(logits.detach(), labels, ids, seed)
    loss = per_sample_losses(logits, labels).sum()
    if loss.requires_grad:
        loss.backward()
        return labels, True
    return labels, False


def hooked_passes(net: nn.Module, batches, handles, bar, *, max_samples, rank: int, world: int, pad_empty: bool,
                  device, fisher: str, seed: int):
    """Runs :func:`backward_summed_losses` over this rank's samples of ``batches`` (model frozen, eval mode),
    yielding (sample ids, labels used, whether a backward ran) per sub-batch; removes the hook ``handles`` and
    closes the progress ``bar`` at the end, also on an error. The hooks do the estimator's work."""
    try:
        with _Frozen(net), torch.enable_grad():
            for sub, ids, n_batch in _iter_samples(batches, max_samples, rank, world, pad_empty):
                if bar is not None:
                    bar.update(n_batch)
                if sub is None:
                    continue
                labels, ran = backward_summed_losses(net, sub, ids, device, fisher, seed)
                yield ids, labels, ran
    finally:
        for h in handles:
            h.remove()
        if bar is not None:
            bar.close()


class _Frozen:
    """Context: eval mode and every parameter frozen; restores both."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.training = self.model.training
        self.flags = [(p, p.requires_grad) for p in self.model.parameters()]
        self.model.eval()
        for p, _ in self.flags:
            p.requires_grad_(False)
        return self

    def __exit__(self, *exc):
        for p, flag in self.flags:
            p.requires_grad_(flag)
        self.model.train(self.training)
        return False


def _deliver(sink: Callable[[Tensor, Tensor], None], module, inputs, output):
    """Forward hook: keeps the layer's input x and, in the backward, hands (δ = ∂loss/∂output, x) to ``sink``.
    When nothing upstream requires grad (all parameters frozen), the output is replaced by a leaf that does."""
    X = inputs[0].detach()
    out = output
    replaced = not out.requires_grad
    if replaced:
        out = out.detach().requires_grad_(True)
    out.register_hook(lambda g: sink(g.detach(), X))
    return out if replaced else None


def hook_layer_gradients(sinks: Sequence[Tuple[nn.Module, Callable[[Tensor, Tensor], None]]]) -> List:
    """Registers, for each (module, sink), a forward hook that calls ``sink(δ, x)`` during the backward with the
    module's output gradient δ (b, T, out) and input x (b, T, in): the per-sample gradient G_i = δ_iᵀ x_i of every
    estimator, never formed here. Returns the handles (``hooked_passes`` removes them)."""
    return [mod.register_forward_hook(functools.partial(_deliver, sink)) for mod, sink in sinks]
