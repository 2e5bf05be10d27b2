"""Fixtures for the DriftCaps tests: a tiny random chat model + tokenizer (helpers in _dc_tiny.py)."""
from __future__ import annotations

import pytest

from _dc_tiny import TINY_PROMPTS, make_model, make_tokenizer


@pytest.fixture
def tiny_lm():
    tok = make_tokenizer()
    return make_model(tok), tok


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A tiny model + tokenizer saved as a local HF directory."""
    tok = make_tokenizer()
    model = make_model(tok)
    path = tmp_path / "tiny-model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def tiny_prompts():
    return [dict(p) for p in TINY_PROMPTS]
