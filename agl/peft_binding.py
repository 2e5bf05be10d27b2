"""Find the peft LoRA layers of a model and the factors AGL regularises.

Binds to unmodified peft: every LoRA layer is a ``peft.tuners.lora.LoraLayer`` with ``lora_A[adapter]`` (r x n) and
``lora_B[adapter]`` (m x r) linear modules, ``scaling[adapter]``, ``get_base_layer()``, ``active_adapters`` and
``merged``. The update of one adapter is ``scaling * B @ A`` in the (out, in) = (m, n) orientation of ``nn.Linear``;
``fan_in_fan_out`` layers (GPT-2 ``Conv1D``) store their weight transposed, (in, out), and so does the state
(``agl.AlignmentState`` keeps every tensor in the base weight's own shape).

DDP (replicated parameters) and FSDP2 (``DTensor`` parameters sharded by rows; ``AGLLoss`` then holds the Fisher by
rows too, see ``agl.distributed``) are supported. FSDP1 (``FlatParameter``) and DeepSpeed ZeRO-3 (weights partitioned
to empty tensors) raise ``NotImplementedError`` naming the layer and pointing to FSDP2.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch import nn

__all__ = ["AdapterFactors", "LoraBinding", "find_lora_layers", "unwrap_model", "base_weight_shape", "LayerFilter"]

LayerFilter = Union[None, str, Sequence[str], Callable[[str], bool]]


@dataclass
class AdapterFactors:
    """One active adapter of one LoRA layer: ``lora_A`` weight (r, n), ``lora_B`` weight (m, r), ``scaling``."""

    adapter: str
    A: nn.Parameter
    B: nn.Parameter
    scaling: float


@dataclass
class LoraBinding:
    """A peft LoRA layer: its qualified name, the module, the base weight's shape and its active adapters."""

    name: str
    module: nn.Module
    shape: tuple  # the base weight's shape: (out, in), or (in, out) when fan_in_fan_out
    fan_in_fan_out: bool
    adapters: List[AdapterFactors] = field(default_factory=list)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel / DataParallel / ``torch.compile`` wrappers, so layer names match the state's."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _lora_layer_class():
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError as exc:  # pragma: no cover - peft is a dependency
        raise ImportError("agl: binding to LoRA layers needs `peft` (pip install peft)") from exc
    return LoraLayer


def base_weight_shape(module: nn.Module) -> tuple:
    """The (rows, cols) of a LoRA layer's base weight as stored: (out, in), or (in, out) when ``fan_in_fan_out``."""
    m, n = int(module.out_features), int(module.in_features)
    return (n, m) if getattr(module, "fan_in_fan_out", False) else (m, n)


def _is_sharded(p: torch.Tensor) -> Optional[str]:
    """Why ``p`` cannot be regularised (a sharding layout AGL does not support), or None. FSDP2 DTensors are
    supported (``AGLLoss`` checks their layout and takes the row-sharded path)."""
    cls = type(p).__name__
    if cls == "FlatParameter" or getattr(p, "_is_flat_param", False):
        return "FSDP1 FlatParameter"
    if hasattr(p, "ds_id") or hasattr(p, "ds_status"):
        return "DeepSpeed ZeRO-3 partitioned parameter"
    if cls == "DTensor" or hasattr(p, "_spec") and hasattr(p, "_local_tensor"):
        return None
    if p.numel() == 0:
        return "empty (partitioned) parameter"
    return None


def _match(name: str, layers: LayerFilter) -> bool:
    if layers is None:
        return True
    if callable(layers):
        return bool(layers(name))
    if isinstance(layers, str):
        import re

        return re.search(layers, name) is not None
    return name in set(layers)


def find_lora_layers(model: nn.Module, layers: LayerFilter = None, *, require: bool = True) -> List[LoraBinding]:
    """Every peft LoRA layer of ``model`` (DDP wrappers stripped) with its active adapters, in ``named_modules`` order.

    ``layers`` filters by qualified name: a regular expression (``re.search``), a collection of exact names, or a
    callable ``name -> bool``. Raises ``ValueError`` if no LoRA layer is found (with ``require``) or an adapter is
    merged into its base weight, ``NotImplementedError`` for non-Linear LoRA layers (embedding, conv) and for
    FSDP1 / ZeRO-3 parameters (FSDP2 DTensors are returned as they are).
    """
    LoraLayer = _lora_layer_class()
    model = unwrap_model(model)
    found: List[LoraBinding] = []
    merged: List[str] = []
    saw_any = False
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        saw_any = True
        if not _match(name, layers):
            continue
        if getattr(module, "disable_adapters", False):
            continue
        active = [a for a in module.active_adapters if a in module.lora_A]
        if not active:
            continue
        if getattr(module, "merged", False):
            merged.append(name)
            continue
        adapters = []
        for a in active:
            la, lb = module.lora_A[a], module.lora_B[a]
            if not isinstance(la, nn.Linear) or not isinstance(lb, nn.Linear):
                raise NotImplementedError(
                    f"agl: LoRA layer {name!r} (adapter {a!r}) is a {type(module).__name__} with "
                    f"{type(la).__name__} factors; AGL supports Linear LoRA layers only"
                )
            for pname, p in (("lora_A", la.weight), ("lora_B", lb.weight)):
                why = _is_sharded(p)
                if why:
                    raise NotImplementedError(
                        f"agl: {name}.{pname}[{a!r}] is a {why}, a sharding AGL does not support (DeepSpeed "
                        "ZeRO-3, FSDP1). Shard the model with FSDP2 instead (torch.distributed.fsdp.fully_shard, or "
                        "accelerate with fsdp_version: 2; see the README, 'Multi-GPU: FSDP2'), or use DDP / ZeRO-1/2"
                    )
            adapters.append(AdapterFactors(a, la.weight, lb.weight, float(module.scaling[a])))
        found.append(LoraBinding(name, module, base_weight_shape(module), bool(getattr(module, "fan_in_fan_out", False)), adapters))
    if merged:
        raise ValueError(
            f"agl: {len(merged)} LoRA layer(s) have their adapter merged into the base weights ({merged[0]}"
            + (f", ... {merged[-1]}" if len(merged) > 1 else "")
            + "); call `model.unmerge_adapter()` before training with AGL"
        )
    if require and not found:
        what = type(model).__name__
        if not saw_any:
            raise ValueError(
                f"agl: no peft LoRA layers found in {what}; wrap the model with `peft.get_peft_model(model, LoraConfig(...))` first"
            )
        raise ValueError(f"agl: no active, enabled LoRA layer of {what} matches the layer filter {layers!r}")
    return found


def named_lora_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """Name -> module for every peft LoRA layer (no checks); used to resolve Fisher hook targets."""
    LoraLayer = _lora_layer_class()
    return {n: m for n, m in unwrap_model(model).named_modules() if isinstance(m, LoraLayer)}


def resolve_targets(model: nn.Module, modules: Optional[Iterable[str]] = None) -> Dict[str, tuple]:
    """Name -> (module to hook, fan_in_fan_out, weight shape as stored) for Fisher estimation.

    Default: the base layer of every peft LoRA layer (named by the LoRA layer). Explicit ``modules`` may name LoRA
    layers (their base layer is hooked) or plain ``nn.Linear`` modules.
    """
    model = unwrap_model(model)
    lora = named_lora_layers(model)
    if modules is None:
        if not lora:
            raise ValueError(
                f"agl: no peft LoRA layers found in {type(model).__name__}; wrap it with peft or pass `modules=[...]` "
                "naming nn.Linear layers"
            )
        return {n: (m.get_base_layer(), bool(getattr(m, "fan_in_fan_out", False)), base_weight_shape(m)) for n, m in lora.items()}
    all_mods = dict(model.named_modules())
    out, bad = {}, []
    for n in modules:
        mod = all_mods.get(n)
        if n in lora:
            out[n] = (lora[n].get_base_layer(), bool(getattr(lora[n], "fan_in_fan_out", False)), base_weight_shape(lora[n]))
        elif isinstance(mod, nn.Linear):
            out[n] = (mod, False, (mod.out_features, mod.in_features))
        elif mod is not None and type(mod).__name__ == "Conv1D":
            out[n] = (mod, True, tuple(mod.weight.shape))
        else:
            bad.append(n if mod is None else f"{n} ({type(mod).__name__})")
    if bad:
        raise ValueError(f"agl: these `modules` are not LoRA layers or nn.Linear modules of the model: {', '.join(bad)}")
    return out
