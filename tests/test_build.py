"""The compiled extension: it loads, registers its kernels with the dispatcher, refuses a mismatched torch, and is
a CUDA build wherever one can be built (a CUDA torch and a CUDA toolkit): a silent CPU-only build fails here."""
from __future__ import annotations

import ast
import importlib
import os
import shutil
import subprocess
import types
from pathlib import Path

import pytest
import torch

from agl import _load

SETUP_PY = Path(__file__).resolve().parents[1] / "setup.py"


_SETUP_HELPERS = ("_log", "_real_cuda_home", "_want_cuda", "_bench_ops", "_drop_stale_extension", "_mem_available_gib", "_max_jobs",
                  "_code_state", "_write_build_info")


def _setup_helpers() -> dict:
    """The helper functions of setup.py (build choice, MAX_JOBS, build record), without running ``setup()``: their
    definitions are executed alone in a fresh namespace."""
    tree = ast.parse(SETUP_PY.read_text(encoding="utf-8"))
    keep = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))
            or (isinstance(n, ast.FunctionDef) and n.name in _SETUP_HELPERS)]
    ns: dict = {"__name__": "agl_setup_helpers"}
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(SETUP_PY), "exec"), ns)
    return ns


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
    assert _load.extension() is not None and _load.load_error() is None


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


def _fake_torch(cuda):
    return types.SimpleNamespace(__version__="2.14.1" + (f"+cu{cuda.replace('.', '')}" if cuda else "+cpu"),
                                 version=types.SimpleNamespace(cuda=cuda))


def test_setup_refuses_a_silent_cpu_only_build(monkeypatch):
    """A CUDA torch without a CUDA toolkit is a build error naming the way out, not a quiet CPU-only build."""
    ns = _setup_helpers()
    for var in ("AGL_CPU_ONLY", "AGL_FORCE_CUDA"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setitem(ns, "_real_cuda_home", lambda: None)
    with pytest.raises(SystemExit, match="no CUDA toolkit.*AGL_CPU_ONLY=1"):
        ns["_want_cuda"](_fake_torch("13.0"))
    assert ns["_want_cuda"](_fake_torch(None)) is False  # a CPU torch: a CPU-only build is the only one possible
    monkeypatch.setenv("AGL_CPU_ONLY", "1")
    assert ns["_want_cuda"](_fake_torch("13.0")) is False  # asked for
    monkeypatch.delenv("AGL_CPU_ONLY")
    monkeypatch.setitem(ns, "_real_cuda_home", lambda: "/usr/local/cuda")
    assert ns["_want_cuda"](_fake_torch("13.0")) is True


def _built_tree(tmp_path, build_info: str):
    """setup.py's helpers rooted at tmp_path, which holds a built library and ``build_info`` as its record."""
    ns = _setup_helpers()
    ns["ROOT"] = tmp_path
    (tmp_path / "agl").mkdir()
    so = tmp_path / "agl" / "_C.cpython-311-x86_64-linux-gnu.so"
    so.write_bytes(b"\x7fELF")
    (tmp_path / "agl" / "_build_info.py").write_text(build_info)
    return ns, so


def test_setup_drops_an_extension_built_the_other_way(tmp_path):
    """build_ext keeps an up-to-date library whatever flags built it; setup.py removes one of the other kind."""
    ns, so = _built_tree(tmp_path, "WITH_CUDA = False\n")
    ns["_drop_stale_extension"](False)  # same kind: kept
    assert so.exists()
    ns["_drop_stale_extension"](True)  # a CPU-only library where a CUDA one is wanted: removed, so it is rebuilt
    assert not so.exists()


def test_setup_drops_an_extension_with_other_bench_ops(tmp_path, monkeypatch):
    """A bench/test build (AGL_BENCH_OPS=1) and a plain one differ in their sources: build_ext would keep either."""
    ns, so = _built_tree(tmp_path, "WITH_CUDA = False\nBENCH_OPS = True\n")
    monkeypatch.setenv("AGL_BENCH_OPS", "1")
    ns["_drop_stale_extension"](False)  # the same build: kept
    assert so.exists()
    monkeypatch.delenv("AGL_BENCH_OPS")
    ns["_drop_stale_extension"](False)  # a plain build over a bench one: removed
    assert not so.exists()


def test_cuda_build_wherever_one_can_be_built():
    """With a CUDA torch and a CUDA toolkit here, the extension must have its CUDA kernels (so every .cu compiled),
    whether or not a GPU is present. Only an explicit AGL_CPU_ONLY=1 build is exempt (`make test` never makes one)."""
    import agl.ops

    if torch.version.cuda is None:
        pytest.skip(f"torch {torch.__version__} is a CPU build: no CUDA build is possible")
    home = _setup_helpers()["_real_cuda_home"]()
    if home is None:
        pytest.skip("no CUDA toolkit (nvcc) here: setup.py refuses to build without AGL_CPU_ONLY=1")
    if getattr(_build_info(), "CPU_ONLY_REQUESTED", False):
        pytest.skip("the extension was built with AGL_CPU_ONLY=1 on request")
    assert agl.ops.with_cuda(), (
        f"torch {torch.__version__} is a CUDA build and a CUDA toolkit is at {home}, but the extension is a CPU-only "
        "build: rebuild it (`make build`); a CPU-only build leaves every .cu uncompiled")
    assert _build_info().WITH_CUDA


def test_max_jobs_comes_from_memavailable_not_free_pages(tmp_path, monkeypatch):
    """20 GiB available but almost no free pages (a full page cache) is a parallel build, not a serial one."""
    ns = _setup_helpers()
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemFree:          200000 kB\nMemAvailable:   20971520 kB\n")
    assert ns["_mem_available_gib"](str(meminfo)) == 20.0
    monkeypatch.delenv("MAX_JOBS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    ns["_max_jobs"](str(meminfo))
    assert os.environ["MAX_JOBS"] == "6"  # one job per 3 GiB available, at most one per CPU
    monkeypatch.setenv("MAX_JOBS", "2")  # the user's choice wins
    ns["_max_jobs"](str(meminfo))
    assert os.environ["MAX_JOBS"] == "2"
    assert ns["_mem_available_gib"](str(tmp_path / "missing")) is None


def test_build_info_records_the_code_it_was_built_from(tmp_path):
    from agl._provenance import git_state, source_digest

    ns = _setup_helpers()
    ns["ROOT"] = tmp_path
    (tmp_path / "agl").mkdir()
    shutil.copy(SETUP_PY.parent / "agl" / "_provenance.py", tmp_path / "agl" / "_provenance.py")
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "k.cpp").write_text("int k;\n")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["git", "add", "."], cwd=tmp_path, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c"], cwd=tmp_path, check=True)
    ns["_write_build_info"](torch, False)
    info: dict = {}
    exec((tmp_path / "agl" / "_build_info.py").read_text(), info)
    assert info["GIT_COMMIT"] == git_state(tmp_path)["git_commit"] and info["GIT_DIRTY"] is False
    assert info["CSRC_DIGEST"] == source_digest(tmp_path, ("csrc",))
    assert info["WITH_CUDA"] is False
