"""The README's result tables are generated from the committed raw results (tools/render_readme.py): a table that
disagrees with its JSON, or a missing table, fails here. Fix with `python tools/render_readme.py`."""
from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import render_readme  # noqa: E402
from render_readme import TABLES, blocks, render, stale  # noqa: E402

README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_every_table_is_in_the_readme():
    assert set(blocks(README)) == set(TABLES)


def test_readme_tables_match_the_raw_results():
    bad = stale(README)
    assert not bad, f"README blocks {bad} differ from their JSON: run `python tools/render_readme.py`"
    assert render(README) == README


@pytest.mark.parametrize("name", sorted(TABLES))
def test_a_changed_number_is_caught(name):
    """The first number of the block's text, one digit changed: that block (and only it) is stale."""
    body = blocks(README)[name]
    m = re.search(r"\d", body)
    assert m, f"block {name!r} shows no number"
    digit = "1" if m.group() != "1" else "2"
    changed = body[:m.start()] + digit + body[m.end():]
    assert stale(README.replace(body, changed, 1)) == [name]


def test_a_missing_table_is_caught():
    body = blocks(README)["fisher"]
    cut = README.replace(f"<!-- agl:table fisher -->\n{body}<!-- /agl:table -->\n", "")
    with pytest.raises(ValueError, match=r"missing block\(s\) \['fisher'\]"):
        render(cut)


def test_an_unclosed_or_unknown_block_is_caught():
    with pytest.raises(ValueError, match="not closed"):
        blocks(README + "\n<!-- agl:table extra -->\n")
    with pytest.raises(ValueError, match=r"unknown block\(s\) \['extra'\]"):
        render(README + "\n<!-- agl:table extra -->\n<!-- /agl:table -->\n")


def test_tables_follow_the_json(tmp_path, monkeypatch):
    """Re-rendering reads the JSON (no number is copied into the renderer): a changed row changes the table."""
    results = tmp_path / "results"
    shutil.copytree(ROOT / "bench" / "results", results)
    path = results / "bench_loss.json"
    rows = json.loads(path.read_text())
    # the rows the agl-loss table reports from (2 threads, rank-16 subspaces)
    shown = [i for i, r in enumerate(rows) if r.get("threads") == 2 and r.get("rank") == 16]
    newest = max(shown, key=lambda i: rows[i]["provenance"]["date"])
    rows[newest]["results"]["plain LoRA"]["median_step_s"] = 9.87
    path.write_text(json.dumps(rows))
    monkeypatch.setattr(render_readme, "BENCH", results)
    assert "| plain LoRA | 9.87 s |" in TABLES["agl-loss"]()
    assert stale(README) == ["agl-loss"]


def test_check_command(capsys):
    assert render_readme.main(["--check"]) == 0
    assert "up to date" in capsys.readouterr().out


def test_layout_names_every_source_file():
    """The README's layout table names every file under csrc/ (a new kernel or glue file is documented with it)."""
    layout = README.split("## Layout", 1)[1]
    missing = [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "csrc").rglob("*")) if p.is_file()
               and f"`{p.relative_to(ROOT).as_posix()}`" not in layout]
    assert not missing, f"README ## Layout does not name {missing}"
