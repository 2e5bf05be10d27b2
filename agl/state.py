"""``AlignmentState``: per-layer alignment Fisher and subspaces, saved as safetensors with a JSON header.

File format (``FORMAT_VERSION`` 1): one ``.safetensors`` file. Tensors are named ``"<layer>/fisher"`` (m x n),
``"<layer>/U"`` (m x k), ``"<layer>/V"`` (n x k') and, with a cross-layer curvature, ``"<layer>/C"`` (N x k x k': the
per-sample gradients projected on U and V, ``agl.curvature``); the safetensors ``__metadata__`` holds one key, ``"agl"``, a JSON
object ``{"format": "agl.alignment_state", "version": 1, "layers": {name: {"shape": [m, n], "rank_U": k|null,
"rank_V": k'|null}}, "names": [layer order], "num_samples": N, "num_tokens": T, "fisher_scale": s, "fisher_dtype": "float32"|"bfloat16",
"options": {...}, "sha256": {tensor name: hex digest}}``. ``num_tokens`` (the labelled tokens that carried the loss) was
added later within version 1: a file without it loads with ``num_tokens = 0`` (unknown), and readers that predate it
ignore it. ``sha256`` (also added within version 1; older readers ignore it) is a digest per tensor of its name,
dtype, shape and bytes: ``load`` recomputes it and refuses a file whose tensors changed after saving (a flipped bit in
the Fisher would otherwise load silently and change the regulariser); a file without it (an older save) loads with a
warning. ``cross`` (also added within version 1; absent without a cross-layer curvature) is ``{"samples": N,
"tokens": ΣT}``: the samples whose projected gradients ``C`` hold and their labelled tokens.
``m x n`` is the base weight's shape as stored (``(out, in)`` for ``nn.Linear``, ``(in, out)`` for ``fan_in_fan_out``).
Loading never unpickles (safetensors only); saving is atomic (temporary file in the same folder, then ``os.replace``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Optional

import torch
from torch import Tensor

from agl._io import atomic_output

__all__ = ["LayerState", "AlignmentState", "FORMAT_VERSION", "STATE_FILENAME"]

FORMAT_VERSION = 1
STATE_FILENAME = "alignment_state.safetensors"
_FORMAT = "agl.alignment_state"


@dataclass
class LayerState:
    """One layer: ``fisher`` (m x n, globally normalised to mean 1 over all layers), ``U`` (m x k, orthonormal
    columns: top eigenvectors of S_out = mean_i G_i G_i^T) or None, ``V`` (n x k') or None. ``S_out``/``S_in`` are
    kept only when estimation asked for them (``keep_moments=True``) and are never saved. ``C`` (N x k x k'):
    the per-sample gradients projected on U and V (``agl.curvature.estimate_cross_curvature``), or None."""

    fisher: Tensor
    U: Optional[Tensor] = None
    V: Optional[Tensor] = None
    S_out: Optional[Tensor] = None
    S_in: Optional[Tensor] = None
    C: Optional[Tensor] = None

    @property
    def shape(self) -> tuple:
        return tuple(self.fisher.shape)


def tensor_digest(name: str, t: Tensor) -> str:
    """sha256 hex digest of one stored tensor: its name, dtype, shape and raw bytes (CPU, contiguous), each
    length-prefixed so no two different (name, dtype, shape, bytes) give the same stream."""
    t = t.detach().to("cpu").contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return stream_digest(name, t.dtype, tuple(t.shape), [raw])


def stream_digest(name: str, dtype: torch.dtype, shape: tuple, chunks: Iterable[bytes]) -> str:
    """:func:`tensor_digest` of a tensor given as consecutive pieces of its raw bytes (e.g. blocks of rows read from
    a file), so a large tensor is verified without holding it whole."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    h = hashlib.sha256()
    for part in (name.encode(), str(dtype).encode(), json.dumps(list(shape)).encode()):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    h.update(nbytes.to_bytes(8, "little"))
    seen = 0
    for c in chunks:
        h.update(c)
        seen += len(c)
    if seen != nbytes:
        raise ValueError(f"agl: digest of {name!r}: got {seen} bytes, its dtype and shape need {nbytes}")
    return h.hexdigest()


def _verify_digests(target: str, recorded: Optional[Dict[str, str]], tensors: Dict[str, Tensor]) -> None:
    """Raise a ValueError naming ``target`` and every tensor whose digest differs from the header's ``sha256``;
    warn when the header has none (a file saved by an older agl)."""
    if recorded is None:
        warnings.warn(f"agl: {target!r} has no tensor checksum (saved by an older agl): its Fisher and subspaces "
                      "cannot be verified; save it again to add one", UserWarning, stacklevel=3)
        return
    problems = [f"{n}: in the header, missing from the file" for n in sorted(set(recorded) - set(tensors))]
    problems += [f"{n}: in the file, not in the header's checksum" for n in sorted(set(tensors) - set(recorded))]
    for n in sorted(set(recorded) & set(tensors)):
        actual = tensor_digest(n, tensors[n])
        if actual != recorded[n]:
            problems.append(f"{n}: sha256 {actual[:16]}… but the header records {recorded[n][:16]}…")
    if problems:
        raise ValueError(f"agl: {target!r} is corrupt: its tensors do not match the checksum recorded when it was "
                         f"saved ({len(problems)} mismatch(es)):\n  " + "\n  ".join(problems))


def _resolve(path: str) -> str:
    path = os.fspath(path)
    return path if path.endswith(".safetensors") else os.path.join(path, STATE_FILENAME)


@dataclass
class AlignmentState:
    """Where alignment lives in each LoRA-adapted layer; built by ``agl.fisher.estimate_alignment_state``.

    ``layers`` maps the qualified name of each adapted module (as ``model.named_modules()`` gives it for the peft
    LoRA layer, DDP wrappers stripped) to a :class:`LayerState`.
    """

    layers: Dict[str, LayerState]
    num_samples: int = 0
    fisher_scale: float = 1.0  # raw mean Fisher over all layers; fisher = raw / fisher_scale
    options: Dict[str, Any] = field(default_factory=dict)
    num_tokens: int = 0  # labelled tokens of the estimation data (0: unknown, e.g. a file from an older agl)
    cross_samples: int = 0  # samples behind the layers' C (0: no cross-layer curvature)
    cross_tokens: int = 0  # their labelled tokens ΣT (the cross penalty's normaliser)

    @property
    def has_cross(self) -> bool:
        """True when every layer with both subspaces holds its projected per-sample gradients ``C``."""
        with_uv = [ls for ls in self.layers.values() if ls.U is not None and ls.V is not None]
        return self.cross_samples > 0 and bool(with_uv) and all(ls.C is not None for ls in with_uv)

    @property
    def tokens_per_sample(self) -> Optional[float]:
        """Mean labelled tokens per estimation sample, T̄ = num_tokens / num_samples; None when unknown."""
        if self.num_tokens > 0 and self.num_samples > 0:
            return self.num_tokens / self.num_samples
        return None

    @property
    def nats_scale(self) -> float:
        """c such that ``c · fisher`` is the empirical Fisher of the *per-token* loss on the estimation data:
        c = fisher_scale / T̄. ``fisher`` is normalised to mean 1 and ``fisher · fisher_scale`` = mean_i G_i ⊙ G_i is
        the Fisher of each sample's summed token loss; dividing by the mean token count T̄ turns it into the
        Gauss-Newton curvature of the token-averaged loss L = Σ_i ℓ_i / Σ_i T_i. So ½·c·Σ fisher ⊙ ΔW² is the
        second-order prediction of the rise of that loss, in nats per token (docs/MATH.md, "Units"). Without a token
        count (``num_tokens = 0``: a hand-built state or an older file) T̄ is taken as 1, i.e. the stored Fisher is
        read as the per-token one."""
        tps = self.tokens_per_sample
        return self.fisher_scale / (tps if tps is not None else 1.0)

    def __repr__(self) -> str:
        return f"AlignmentState({len(self.layers)} layers, {self.num_samples} samples)"

    # ------------------------------------------------------------------ persistence
    def save(self, path: str, *, fisher_dtype: torch.dtype = torch.float32) -> str:
        """Write the state atomically; ``path`` is a directory (``alignment_state.safetensors`` inside it) or a
        ``.safetensors`` file. ``fisher_dtype=torch.bfloat16`` halves the Fisher's size (U and V stay float32).
        Returns the file written."""
        from safetensors.torch import save_file

        if fisher_dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise ValueError(f"agl: `fisher_dtype` must be float32, bfloat16, float16 or float64, got {fisher_dtype}")
        target = _resolve(path)
        tensors: Dict[str, Tensor] = {}
        layers_meta = {}
        for name, ls in self.layers.items():
            if "/" in name:
                raise ValueError(f"agl: layer name {name!r} contains '/', which the file format reserves")
            tensors[f"{name}/fisher"] = ls.fisher.detach().to("cpu", fisher_dtype).contiguous()
            for key in ("U", "V", "C"):
                t = getattr(ls, key)
                if t is not None:
                    dt = t.dtype if t.dtype == torch.float64 else torch.float32
                    tensors[f"{name}/{key}"] = t.detach().to("cpu", dt).contiguous()
            layers_meta[name] = {
                "shape": list(ls.fisher.shape),
                "rank_U": None if ls.U is None else int(ls.U.shape[1]),
                "rank_V": None if ls.V is None else int(ls.V.shape[1]),
            }
        meta = {
            "format": _FORMAT,
            "version": FORMAT_VERSION,
            "layers": layers_meta,
            "names": list(self.layers),
            "num_samples": int(self.num_samples),
            "num_tokens": int(self.num_tokens),
            "fisher_scale": float(self.fisher_scale),
            "fisher_dtype": str(fisher_dtype).replace("torch.", ""),
            "options": self.options,
            "sha256": {n: tensor_digest(n, t) for n, t in tensors.items()},
        }
        if self.cross_samples:
            meta["cross"] = {"samples": int(self.cross_samples), "tokens": int(self.cross_tokens)}
        with atomic_output(target) as tmp:
            save_file(tensors, str(tmp), metadata={"agl": json.dumps(meta, sort_keys=True)})
        return target

    @classmethod
    def load(cls, path: str, *, device: str | torch.device = "cpu") -> "AlignmentState":
        """Read a state written by :meth:`save` (never unpickles). Raises ``ValueError`` for a missing or foreign file
        and for one whose tensors do not match the checksum in its header; warns for a file without one."""
        from safetensors import safe_open

        target = _resolve(path)
        if not os.path.isfile(target):
            raise ValueError(f"agl: no alignment state at {target!r} (expected a file written by AlignmentState.save)")
        try:
            f = safe_open(target, framework="pt", device="cpu")  # verified on the CPU, then moved
        except Exception as exc:  # safetensors raises its own error types
            raise ValueError(f"agl: {target!r} is not a readable safetensors file ({exc})") from exc
        with f:
            raw = (f.metadata() or {}).get("agl")
            if raw is None:
                raise ValueError(f"agl: {target!r} has no AGL header; it was not written by AlignmentState.save")
            meta = json.loads(raw)
            if meta.get("format") != _FORMAT:
                raise ValueError(f"agl: {target!r} is not an alignment state (format {meta.get('format')!r})")
            if int(meta.get("version", -1)) > FORMAT_VERSION:
                raise ValueError(
                    f"agl: {target!r} has format version {meta['version']}, newer than this agl reads ({FORMAT_VERSION}); "
                    "upgrade agl"
                )
            stored = {k: f.get_tensor(k) for k in f.keys()}
        _verify_digests(target, meta.get("sha256"), stored)
        layers = {}
        for name in meta.get("names", list(meta["layers"])):
            lm = meta["layers"][name]
            fisher = stored.get(f"{name}/fisher")
            if fisher is None:
                raise ValueError(f"agl: {target!r} is corrupt: the header lists layer {name!r} but the file has no {name}/fisher")
            if list(fisher.shape) != list(lm["shape"]):
                raise ValueError(f"agl: {target!r} is corrupt: {name}/fisher has shape {tuple(fisher.shape)}, header says {lm['shape']}")
            U, V, C = stored.get(f"{name}/U"), stored.get(f"{name}/V"), stored.get(f"{name}/C")
            fisher, U, V, C = (None if t is None else t.to(device) for t in (fisher, U, V, C))
            layers[name] = LayerState(fisher, U, V, C=C)
        cross = meta.get("cross") or {}
        return cls(layers, int(meta.get("num_samples", 0)), float(meta.get("fisher_scale", 1.0)), dict(meta.get("options", {})),
                   int(meta.get("num_tokens", 0)), int(cross.get("samples", 0)), int(cross.get("tokens", 0)))

    # ------------------------------------------------------------------ selection and validation
    def subset(self, names) -> "AlignmentState":
        """The state restricted to some layers (same ``fisher_scale``, ``num_samples``, ``num_tokens``, so every
        kept layer's Fisher, subspaces and nats are exactly as they were). ``names``: a model (its peft LoRA
        layers: ``state.subset(peft_model)`` fits a state estimated on more target modules to this adapter), a
        regular expression (``re.search``), a collection of exact layer names, or a callable ``name -> bool``
        (the filters ``AGLConfig(layers=...)`` takes). Tensors are shared, not copied. Raises ``ValueError`` when a
        named layer is not in the state or nothing is selected."""
        from torch import nn

        from agl.peft_binding import _match, named_lora_layers

        if isinstance(names, nn.Module):
            names = list(named_lora_layers(names))
        elif not (names is None or isinstance(names, str) or callable(names)):
            try:
                names = list(names)
            except TypeError:
                raise ValueError(f"AlignmentState.subset: `names` must be a model, a regex, a collection of layer "
                                 f"names or a callable, got {type(names).__name__}") from None
            unknown = [n for n in names if n not in self.layers]
            if unknown:
                raise ValueError(f"AlignmentState.subset: {len(unknown)} of the `names` are not layers of the state "
                                 f"(it has {len(self.layers)}):\n  " + _capped(unknown))
        kept = {n: ls for n, ls in self.layers.items() if _match(n, names)}
        if not kept:
            raise ValueError(f"AlignmentState.subset: `names` ({names!r}) selects none of the state's "
                             f"{len(self.layers)} layers")
        return dataclasses.replace(self, layers=kept, options=dict(self.options))  # a sharded state stays sharded

    def check(self, model, layers=None) -> None:
        """Raise one ``ValueError`` when the state does not fit the model's LoRA layers. Its first line says what is
        wrong and how to fix it; then at most ``_MAX_LISTED`` of the layers concerned. Checked: every adapted layer
        (those ``layers`` selects, see ``agl.peft_binding.find_lora_layers``) has a state entry of its shape, and
        every state layer is adapted by the model, except, when ``layers`` is given, those it does not select
        (a state estimated on more modules than the adapter: ``AGLConfig(layers=...)`` or :meth:`subset`)."""
        from agl.peft_binding import _match, find_lora_layers, named_lora_layers

        missing, shapes, extra = [], [], []
        for b in find_lora_layers(model, layers):
            ls = self.layers.get(b.name)
            if ls is None:
                missing.append(f"{b.name}: in the model, missing from the state")
                continue
            m, n = b.shape
            if ls.shape != (m, n):
                shapes.append(f"{b.name}: state Fisher is {ls.shape[0]}x{ls.shape[1]}, the model's base weight is {m}x{n}")
                continue
            if ls.U is not None and ls.U.shape[0] != m:
                shapes.append(f"{b.name}: state U has {ls.U.shape[0]} rows, expected {m}")
            if ls.V is not None and ls.V.shape[0] != n:
                shapes.append(f"{b.name}: state V has {ls.V.shape[0]} rows, expected {n}")
        in_model = set(named_lora_layers(model))
        for name in self.layers:
            if name not in in_model and (layers is None or _match(name, layers)):
                extra.append(f"{name}: in the state, not a LoRA layer of the model")
        problems = missing + shapes + extra
        if not problems:
            return
        why = []
        if missing:
            why.append(f"the model adapts {len(missing)} layer(s) the state has no Fisher for (estimate the state "
                       "with the adapter's target modules: agl fisher --target-modules, or pass --adapter)")
        if shapes:
            why.append(f"{len(shapes)} layer(s) differ in shape (the state was estimated on another model: "
                       "estimate it on this one)")
        if extra and layers is None:
            why.append(f"the state covers {len(extra)} layer(s) the model does not adapt (to regularise only the "
                       "adapted layers: AGLConfig(layers=<their names or a regex>) or state.subset(peft_model))")
        elif extra:
            why.append(f"`layers` selects {len(extra)} state layer(s) the model does not adapt (narrow `layers` to "
                       "the adapted layers, or use state.subset(peft_model))")
        raise ValueError(f"agl: the alignment state does not match the model ({len(problems)} problem(s)): "
                         + "; ".join(why) + "\n  " + _capped(problems))


_MAX_LISTED = 10


def _capped(lines, limit: int = _MAX_LISTED) -> str:
    """At most ``limit`` lines, then "... and N more"."""
    lines = list(lines)
    more = [f"... and {len(lines) - limit} more"] if len(lines) > limit else []
    return "\n  ".join(lines[:limit] + more)
