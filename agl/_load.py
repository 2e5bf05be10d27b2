"""Load the compiled extension and check it matches the running torch."""
from __future__ import annotations

import torch

_EXT = None
_ERROR: str | None = None


def _torch_base(version: str) -> tuple:
    parts = version.split("+")[0].split(".")
    return tuple(int(p) if p.isdigit() else p for p in parts[:3])


def _load():
    global _EXT, _ERROR
    try:
        from agl import _build_info
    except ImportError:
        _ERROR = "agl's C++/CUDA extension is not built (run `pip install --no-build-isolation -e .`)"
        return
    running = _torch_base(torch.__version__)
    if running != _torch_base(_build_info.TORCH_VERSION) or (
        _build_info.WITH_CUDA and torch.version.cuda != _build_info.TORCH_CUDA
    ):
        raise ImportError(
            f"agl was built against torch {_build_info.TORCH_VERSION} (CUDA {_build_info.TORCH_CUDA}) but torch "
            f"{torch.__version__} (CUDA {torch.version.cuda}) is running: rebuild agl for this torch with "
            "`pip install --no-build-isolation --force-reinstall --no-deps -e .`"
        )
    try:
        from agl import _C  # noqa: F401  (registers agl::terms_fwd / agl::terms_bwd)
    except ImportError as exc:
        _ERROR = f"agl's compiled extension failed to load ({exc}); rebuild with `pip install --no-build-isolation -e .`"
        return
    _EXT = _C


def extension():
    """The loaded `agl._C` module, or None (then `load_error()` says why)."""
    return _EXT


def load_error() -> str | None:
    return _ERROR


_load()
