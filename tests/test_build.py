"""The compiled extension: it loads, registers its kernels with the dispatcher, and refuses a mismatched torch."""
from __future__ import annotations

import importlib

import pytest
import torch

from agl import _load


def _build_info():
    try:
        return importlib.import_module("agl._build_info")
    except ImportError:
        pytest.fail("agl/_build_info.py is missing: the extension was never built")


def test_extension_loads():
    assert _load.extension() is not None, _load.load_error()
    assert hasattr(torch.ops.agl, "terms_fwd") and hasattr(torch.ops.agl, "terms_bwd")


def test_build_info_matches_running_torch():
    info = _build_info()
    assert _load._torch_base(info.TORCH_VERSION) == _load._torch_base(torch.__version__)
    assert isinstance(info.WITH_CUDA, bool)
    assert bool(_load.extension().with_cuda()) == info.WITH_CUDA


@pytest.mark.parametrize("op", ["agl::terms_fwd", "agl::terms_bwd"])
def test_kernels_registered_with_dispatcher(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU")
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")
    # A CUDA build must register its CUDA kernels; a CPU-only build must not pretend to.
    assert has_cuda == _build_info().WITH_CUDA
    import agl.ops  # noqa: F401  (registers the fakes and the autograd formula)

    assert torch._C._dispatch_has_kernel_for_dispatch_key("agl::terms_fwd", "Autograd")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "Meta")  # the fake


@pytest.mark.cuda
def test_cuda_kernel_runs():
    if not _build_info().WITH_CUDA:
        pytest.skip("CPU-only build")
    B, A = torch.randn(8, 2, device="cuda"), torch.randn(2, 9, device="cuda")
    t, s = torch.ops.agl.terms_fwd(B, A, None, None, None, None, None, 1.0, 4.0, 0.01, 100.0, 1e-12)
    assert t.device.type == s.device.type == "cuda" and t.shape == (4,) and s.shape == (5,)


def test_torch_base_parses_numerically():
    assert _load._torch_base("2.14.1+cu130") == (2, 14, 1)
    assert _load._torch_base("2.10.0") != _load._torch_base("2.1.0")  # not a string prefix comparison


@pytest.mark.parametrize("field,value", [("TORCH_VERSION", "1.0.0"), ("TORCH_CUDA", "0.1")])
def test_rebuild_message_on_mismatch(monkeypatch, field, value):
    info = _build_info()
    monkeypatch.setattr(info, field, value)
    if field == "TORCH_CUDA":
        monkeypatch.setattr(info, "WITH_CUDA", True)
    with pytest.raises(ImportError, match="rebuild agl for this torch"):
        _load._load()


def test_no_message_when_matching():
    _load._load()  # the real build info matches: must not raise, and keeps the extension
    assert _load.extension() is not None


def test_missing_build_reports_error(monkeypatch):
    import sys

    import agl

    monkeypatch.setitem(sys.modules, "agl._build_info", None)  # makes `from agl import _build_info` fail
    monkeypatch.delattr(agl, "_build_info", raising=False)
    monkeypatch.setattr(_load, "_ERROR", None)
    saved = _load._EXT
    try:
        _load._load()
        assert "not built" in _load.load_error()
    finally:
        _load._EXT = saved
        _load._ERROR = None
