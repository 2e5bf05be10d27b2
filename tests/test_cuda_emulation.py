"""CPU emulation of the CUDA kernels (tests/cuda_emu/): compiles csrc/cuda/agl_cuda.cu (emu_main.cpp) and the grouped
tensor-core kernels of csrc/cuda/agl_cuda_grouped.cu (emu_grouped.cpp, through an mma.sync fragment emulator) as host
C++ with a tiny CUDA shim (one std::thread per CUDA thread, real barriers) and checks tiling, partial-slot ownership, barriers
and edge handling against a double-precision loop, with every buffer starting as NaN. Runs without a GPU, so CI
exercises the CUDA kernels' indexing; the GPU tests (tests/test_cuda.py) check the real thing.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # compiles and runs thousands of emulated CUDA threads: about a minute on 2 cores


def _torch_include() -> str | None:
    try:
        from torch.utils.cpp_extension import include_paths
    except Exception:  # pragma: no cover - torch without cpp_extension
        return None
    for p in include_paths():
        if os.path.exists(os.path.join(p, "c10", "util", "Half.h")):
            return p
    return None


def _build_and_run(tmp_path, source: str) -> str:
    """Compiles tests/cuda_emu/<source> as host C++20 and runs it; returns its stdout (asserts "ALL OK")."""
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    inc = _torch_include()
    if cxx is None or inc is None:
        pytest.skip("needs a C++20 compiler and torch's C++ headers")
    exe = tmp_path / Path(source).stem
    cmd = [cxx, "-std=c++20", "-O1", "-pthread", "-Wno-unknown-pragmas", f"-I{ROOT / 'csrc'}", f"-I{ROOT / 'csrc' / 'cuda'}",
           f"-I{inc}", str(ROOT / "tests" / "cuda_emu" / source), "-o", str(exe)]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if build.returncode != 0 and "barrier" in build.stderr and "No such file" in build.stderr:
        pytest.skip("the C++ standard library lacks <barrier> (C++20)")
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0 and "ALL OK" in run.stdout, run.stdout[-4000:] + run.stderr[-2000:]
    return run.stdout


def test_cuda_kernels_emulated_on_cpu(tmp_path):
    _build_and_run(tmp_path, "emu_main.cpp")


def test_grouped_cuda_kernels_emulated_on_cpu(tmp_path):
    """The grouped kernels (csrc/cuda/agl_cuda_grouped.cu) with the mma.sync fragment emulator: warp_mma alone
    (row-major and transposed views, every mma kind), mixed odd-shaped layers against the float64 oracle per dtype,
    and bitwise equality of a layer alone and its row of the grouped
    call, and across persistent-CTA counts (tests/cuda_emu/emu_grouped.cpp)."""
    # the emulator checks every case itself and exits non-zero with "SOME FAILED" on any failed one
    out = _build_and_run(tmp_path, "emu_grouped.cpp")
    assert "FAIL" not in out, out[-4000:]
