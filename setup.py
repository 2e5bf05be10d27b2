"""Build of the `agl` extension (distribution `alignguard-lora`).

A CUDA build when torch is a CUDA build (or AGL_FORCE_CUDA=1); a CPU-only build when torch is a CPU build or with
AGL_CPU_ONLY=1. A CUDA torch without a CUDA toolkit (nvcc) is an error, not a silent CPU-only build: install the
toolkit (or set CUDA_HOME), or ask for the CPU-only build with AGL_CPU_ONLY=1. The choice never depends on
torch.cuda.is_available(), so GPU-less machines build CUDA wheels.
Knobs: AGL_FORCE_CUDA, AGL_CPU_ONLY, TORCH_CUDA_ARCH_LIST (default "9.0": Hopper), MAX_JOBS (default from
MemAvailable), AGL_DEBUG=1 (-O0 -g), AGL_BENCH_OPS=1 (a bench/test build: adds csrc/bench/, the do-nothing
agl_bench:: ops the benchmarks take as their floor; `make build` sets it, a wheel leaves it out).
"""
from __future__ import annotations

import glob
import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()


def _log(msg: str) -> None:
    print(f"[agl build] {msg}", file=sys.stderr)


def _real_cuda_home() -> str | None:
    """CUDA_HOME of the real toolkit. A `nvcc` on PATH may be a wrapper script (`exec /usr/local/cuda-X/bin/nvcc`),
    which would make torch guess its prefix (e.g. /usr/local) and fail to link -lcudart; follow it."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        real = os.path.realpath(nvcc)
        try:
            head = Path(real).read_bytes()[:4096]
            if head.startswith(b"#!"):  # a wrapper script: find the nvcc it execs
                for tok in head.decode(errors="ignore").split():
                    if tok.endswith("/bin/nvcc") and os.path.exists(tok):
                        real = os.path.realpath(tok)
                        break
        except OSError:
            pass
        candidates.append(str(Path(real).parent.parent))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if os.path.exists(os.path.join(c, "bin", "nvcc")) and glob.glob(os.path.join(c, "lib*", "libcudart*")) + glob.glob(
            os.path.join(c, "targets", "*", "lib", "libcudart*")
        ):
            return c
    return None


def _want_cuda(torch) -> bool:
    if os.environ.get("AGL_CPU_ONLY") == "1":
        _log("AGL_CPU_ONLY=1: CPU-only build")
        return False
    if os.environ.get("AGL_FORCE_CUDA") == "1":
        _log("AGL_FORCE_CUDA=1: CUDA build")
        return True
    if torch.version.cuda is None:
        _log(f"torch {torch.__version__} is a CPU build: CPU-only build")
        return False
    if _real_cuda_home() is None:
        # no silent fallback: a CPU-only build of a CUDA torch would pass every test while no .cu was compiled
        raise SystemExit(
            f"[agl build] error: torch {torch.__version__} is a CUDA {torch.version.cuda} build but no CUDA toolkit "
            "(nvcc) was found (looked at CUDA_HOME, CUDA_PATH, nvcc on PATH, /usr/local/cuda*). Install the toolkit "
            "or set CUDA_HOME for the CUDA build, or set AGL_CPU_ONLY=1 for a CPU-only build."
        )
    return True


def _mem_available_gib(meminfo: str = "/proc/meminfo") -> float | None:
    """MemAvailable in GiB (what the kernel can hand out without swapping: free pages *plus* reclaimable page
    cache; free pages alone read near zero on a machine whose cache is full), or None where it cannot be read."""
    try:
        with open(meminfo, encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _max_jobs(meminfo: str = "/proc/meminfo") -> None:
    """Sets MAX_JOBS (unless set): one compile job per 3 GiB available, at least one, at most one per CPU."""
    if "MAX_JOBS" in os.environ:
        return
    avail = _mem_available_gib(meminfo)
    avail_gb = 8.0 if avail is None else avail
    jobs = max(1, min(os.cpu_count() or 1, int(avail_gb // 3)))
    os.environ["MAX_JOBS"] = str(jobs)
    src = "MemAvailable" if avail is not None else "a guess: /proc/meminfo unreadable"
    _log(f"MAX_JOBS={jobs} (from {avail_gb:.0f} GiB, {src}; set MAX_JOBS to override)")


def _extensions():
    import torch
    from torch.utils import cpp_extension

    cuda = _want_cuda(torch)
    debug = os.environ.get("AGL_DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # no -std flag: torch picks the standard its headers need (C++17 for 2.11, C++20 for 2.14)
    # -fno-trapping-math: lets GCC if-convert (and so vectorise) the CPU kernel's clamps/selects; it changes no
    # IEEE result (unlike -ffast-math: NaN/inf semantics are kept)
    cxx = opt + ["-fopenmp", "-fno-trapping-math"]
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    if _bench_ops():
        sources += sorted(glob.glob("csrc/bench/*.cpp"))
    define_macros = []
    extra = {"cxx": cxx}
    if cuda:
        home = _real_cuda_home()
        if home:
            os.environ["CUDA_HOME"] = home
            cpp_extension.CUDA_HOME = home
            _log(f"CUDA_HOME={home}")
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            # torch's build reads the arch of a visible GPU; with none visible it fails. Default to Hopper.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
            _log("TORCH_CUDA_ARCH_LIST not set: building for 9.0 (Hopper, H100/H200); set it for other GPUs (>= 7.5)")
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        extra["nvcc"] = opt + ["--use_fast_math", "-lineinfo"] + (
            ["-Xptxas", "-v"] if os.environ.get("AGL_PTXAS_VERBOSE") == "1" else []
        )
        cxx.append("-DAGL_WITH_CUDA")
        define_macros.append(("AGL_WITH_CUDA", None))
        Ext = cpp_extension.CUDAExtension
    else:
        Ext = cpp_extension.CppExtension
    _drop_stale_extension(cuda)
    _write_build_info(torch, cuda)  # before build_ext runs: a wheel's build_py copies the package first
    _max_jobs()
    return [
        Ext(
            name="agl._C",
            sources=sources,
            include_dirs=[str(ROOT / "csrc")],
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
            define_macros=define_macros,
        )
    ], cpp_extension.BuildExtension.with_options(use_ninja=True)


def _bench_ops() -> bool:
    return os.environ.get("AGL_BENCH_OPS") == "1"


def _drop_stale_extension(cuda: bool) -> None:
    """Remove an in-place ``agl/_C*.so`` built with the other choice (CUDA vs CPU-only, with or without the bench
    ops): build_ext compares only timestamps, so it would keep a CPU-only library next to build info that says CUDA
    (and the reverse)."""
    info = ROOT / "agl" / "_build_info.py"
    text = info.read_text() if info.exists() else ""
    other_bench = "BENCH_OPS = " in text and f"BENCH_OPS = {_bench_ops()!r}" not in text
    if f"WITH_CUDA = {not cuda!r}" in text or other_bench:
        for so in glob.glob(str(ROOT / "agl" / "_C*.so")):
            why = "with other bench ops" if other_bench else ("CPU-only" if cuda else "with CUDA")
            _log(f"removing {os.path.basename(so)}: it was built {why}")
            os.unlink(so)


def _code_state() -> dict:
    """Commit, dirty flag and csrc digest of this checkout, from agl/_provenance.py loaded by path (importing the
    `agl` package would load the extension being built)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_agl_provenance", ROOT / "agl" / "_provenance.py")
    prov = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prov)
    return {**prov.git_state(ROOT), "csrc_digest": prov.source_digest(ROOT, ("csrc",))}


def _write_build_info(torch, cuda: bool) -> None:
    """Record what the extension was built against (`import agl` compares it with the running torch) and from which
    code (every result's provenance compares it with the code on disk: agl._provenance.build_state)."""
    code = _code_state()
    text = (
        '"""Written by setup.py at build time; do not edit."""\n'
        f"TORCH_VERSION = {torch.__version__.split('+')[0]!r}\n"
        f"TORCH_CUDA = {torch.version.cuda!r}\n"
        f"WITH_CUDA = {cuda!r}\n"
        f"CUDA_ARCH_LIST = {os.environ.get('TORCH_CUDA_ARCH_LIST') if cuda else None!r}\n"
        f"CPU_ONLY_REQUESTED = {os.environ.get('AGL_CPU_ONLY') == '1'!r}\n"
        f"BENCH_OPS = {_bench_ops()!r}\n"
        f"GIT_COMMIT = {code['git_commit']!r}\n"
        f"GIT_DIRTY = {code['git_dirty']!r}\n"
        f"CSRC_DIGEST = {code['csrc_digest']!r}\n"
    )
    path = ROOT / "agl" / "_build_info.py"
    tmp = path.with_suffix(".py.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# AGL_SKIP_EXT=1: install the Python package only (the Makefile installs it editable this way, then builds the
# extension once with `setup.py build_ext --inplace`; an editable pip install would otherwise compile it a second
# time in its own build directory)
if os.environ.get("AGL_SKIP_EXT") == "1":
    _log("AGL_SKIP_EXT=1: not building the extension (build it with `python setup.py build_ext --inplace`)")
    ext_modules, build_ext = [], None
else:
    ext_modules, build_ext = _extensions()

setup(
    packages=find_packages(include=["agl", "agl.*"]),
    package_data={"agl": ["driftcaps/data/*.jsonl", "driftcaps/data/judge/*.jsonl", "experiment/data/*"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext} if build_ext else {},
)
