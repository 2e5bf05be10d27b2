"""JSON / Markdown / PNG reports, written atomically."""
from __future__ import annotations

import json
import os

import pytest

from agl.driftcaps import DriftReport, compare, plot_refusal_rates, write_report
from agl._io import atomic_write_text
from agl.driftcaps.report import comparison_markdown, report_markdown


def _report(flip=False):
    recs = []
    for i in range(12):
        cat = ("weapons", "cyber", "drugs")[i % 3]
        recs.append({"id": f"u{i}", "prompt": f"unsafe {i}", "label": "unsafe", "category": cat, "kind": None,
                     "response": "r", "refused": (i % 2 == 0) if not flip else (i % 4 == 0)})
    for i in range(6):
        recs.append({"id": f"s{i}", "prompt": f"safe {i}", "label": "safe", "category": "everyday",
                     "kind": ("plain", "borderline")[i % 2], "response": "r", "refused": i == 1 or (flip and i == 3)})
    recs.append({"id": "e0", "prompt": "empty", "label": "unsafe", "category": "cyber", "kind": None, "response": "",
                 "refused": None, "empty": True})
    return DriftReport(recs, meta={"model": "m-after" if flip else "m-before"})


def test_write_report_files(tmp_path):
    paths = write_report(_report(), tmp_path / "out")
    assert set(paths) == {"json", "markdown", "png"}
    d = json.loads(paths["json"].read_text())
    assert d["kind"] == "driftcaps.report" and len(d["records"]) == 19
    assert d["metrics"]["rr_unsafe"]["n_empty"] == 1
    assert set(d["provenance"]) >= {"git_commit", "git_dirty", "machine", "load_avg", "torch", "date"}
    md = paths["markdown"].read_text()
    assert "| RR_unsafe" in md and "| weapons | unsafe |" in md and "over-refusal, borderline" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in os.listdir(tmp_path / "out") if p.endswith(".tmp")]


def test_write_comparison_files(tmp_path):
    c = compare(_report(), _report(flip=True))
    paths = write_report(c, tmp_path)
    assert paths["json"].name == "comparison.json"
    d = json.loads(paths["json"].read_text())
    assert d["meta"]["before_meta"]["model"] == "m-before"
    assert d["provenance"]["machine"]["cores"] >= 1
    md = comparison_markdown(c)
    assert "McNemar" in md and "| RR_unsafe |" in md and "m-after" in md
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    from agl.driftcaps import Comparison

    back = Comparison.from_json(paths["json"])
    assert back.flips_unsafe == c.flips_unsafe and back.by_category.keys() == c.by_category.keys()


def test_json_is_strict_without_nan(tmp_path):
    only_unsafe = DriftReport([r for r in _report().records if r["label"] == "unsafe"])
    text = only_unsafe.to_json()
    assert "NaN" not in text
    assert json.loads(text)["metrics"]["over_refusal"]["rate"] is None
    assert "n/a" in report_markdown(only_unsafe)
    plot_refusal_rates(only_unsafe, path=tmp_path / "x.png")


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    f = tmp_path / "r.json"
    atomic_write_text(f, "old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(f, "new")
    monkeypatch.undo()
    assert f.read_text() == "old"
    assert os.listdir(tmp_path) == ["r.json"]
