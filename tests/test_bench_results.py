"""bench/_results.py: rows of different commits never overwrite each other; a clean rerun replaces its own rows; a
dirty-tree run is marked and replaces nothing; every committed results file carries provenance."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from _results import append_rows, describe, pick, read_rows  # noqa: E402

KEY = ("shape", "provider")


def add(path, rows, p):
    return append_rows(path, rows, p, key=KEY)


def prov(commit="a" * 40, dirty=False, date="2026-11-30T01:00:00+00:00"):
    return {"git_commit": commit, "git_dirty": dirty, "machine": {"cpu": "AMD EPYC", "cores": 2, "gpu": None},
            "load_avg": [0.5, 0.5, 0.5], "torch": "2.14.1", "python": "3.11.7", "date": date}


def row(ms, shape="4096x4096r16", provider="agl"):
    return {"shape": shape, "provider": provider, "median_ms": ms}


def test_clean_rerun_replaces_only_its_own_rows(tmp_path):
    f = tmp_path / "r.json"
    add(f, [row(1.0), row(9.0, provider="eager")], prov())
    out = add(f, [row(2.0)], prov(date="2026-11-30T02:00:00+00:00"))
    assert sorted((r["provider"], r["median_ms"]) for r in out) == [("agl", 2.0), ("eager", 9.0)]
    assert read_rows(f) == out and all(r["provenance"]["git_commit"] == "a" * 40 for r in out)


def test_rows_of_another_commit_are_kept(tmp_path):
    f = tmp_path / "r.json"
    add(f, [row(1.0)], prov("a" * 40))
    out = add(f, [row(2.0)], prov("b" * 40))
    assert [(r["provenance"]["git_commit"][0], r["median_ms"]) for r in out] == [("a", 1.0), ("b", 2.0)]


def test_dirty_run_is_marked_and_replaces_nothing(tmp_path, capsys):
    f = tmp_path / "r.json"
    add(f, [row(1.0)], prov())
    add(f, [row(2.0)], prov(dirty=True))
    out = add(f, [row(3.0)], prov(dirty=True))  # not even an earlier dirty row of the same commit
    assert [r["median_ms"] for r in out] == [1.0, 2.0, 3.0]
    assert [r["provenance"]["git_dirty"] for r in out] == [False, True, True]
    assert "uncommitted changes" in capsys.readouterr().err
    # and a later clean run of that commit replaces the clean row only
    out = add(f, [row(4.0)], prov())
    assert sorted(r["median_ms"] for r in out) == [2.0, 3.0, 4.0]


def test_backfilled_rows_are_never_replaced(tmp_path):
    f = tmp_path / "r.json"
    old = prov(dirty=None)
    old["backfilled"] = True
    add(f, [row(1.0)], old)
    out = add(f, [row(2.0)], prov())
    assert [r["median_ms"] for r in out] == [1.0, 2.0]


def test_pick_prefers_clean_then_newest():
    rows = [dict(row(1.0), provenance=prov(dirty=True, date="2026-12-01")),
            dict(row(2.0), provenance=prov(date="2026-11-01")),
            dict(row(3.0), provenance=prov(date="2026-11-02")),
            dict(row(4.0), provenance=prov(dirty=None, date="2026-12-02"))]
    assert pick(rows, shape="4096x4096r16")["median_ms"] == 3.0
    assert pick(rows[:1] + rows[3:], provider="agl")["median_ms"] == 4.0
    with pytest.raises(LookupError, match="no result row"):
        pick(rows, shape="1x1r1")


def test_bad_input_is_named(tmp_path):
    f = tmp_path / "r.json"
    with pytest.raises(ValueError, match="identity field"):
        append_rows(f, [{"shape": "1x1r1"}], prov(), key=KEY)
    with pytest.raises(ValueError, match="provenance record"):
        append_rows(f, [row(1.0)], {"date": "x"}, key=KEY)
    f.write_text(json.dumps({"bench": "old format"}))
    with pytest.raises(ValueError, match="expected a JSON list"):
        read_rows(f)
    f.write_text(json.dumps([{"median_ms": 1.0}]))
    with pytest.raises(ValueError, match="row 0 has no `provenance`"):
        read_rows(f)


def test_nan_becomes_null(tmp_path):
    f = tmp_path / "r.json"
    add(f, [dict(row(float("nan")))], prov())
    assert json.loads(f.read_text())[0]["median_ms"] is None


def test_describe_names_code_and_machine():
    p = prov("4976d4f0ee8d016e8e167a0856e7d344c00ac372", dirty=True)
    p["machine"]["gpu"] = "NVIDIA H200"
    assert describe(p) == "commit 4976d4f + uncommitted changes; NVIDIA H200; torch 2.14.1; 2026-11-30"
    old = dict(prov(dirty=None), backfilled=True, date=None, added_on="2026-11-28T19:13:11+00:00")
    assert describe(old) == "commit aaaaaaa, tree state unknown (backfilled); AMD EPYC, 2 cores; torch 2.14.1; added 2026-11-28"


@pytest.mark.parametrize("path", sorted((ROOT / "bench" / "results").glob("*.json")), ids=lambda p: p.name)
def test_every_committed_result_row_has_provenance(path):
    rows = read_rows(path)  # raises for a row without provenance
    assert rows
    for r in rows:
        p = r["provenance"]
        assert set(p) >= {"git_commit", "git_dirty", "machine", "load_avg", "torch", "date"}
        assert set(p["machine"]) >= {"cpu", "cores", "gpu"}
        assert p["git_dirty"] in (True, False, None)
        assert p["git_dirty"] is not None or p.get("backfilled") is True  # unknown only for backfilled rows


@pytest.mark.parametrize("path", sorted((ROOT / "docs" / "results").glob("*/report.json")), ids=lambda p: p.parent.name)
def test_every_committed_report_has_provenance(path):
    p = json.loads(path.read_text())["provenance"]
    assert set(p) >= {"git_commit", "git_dirty", "machine", "load_avg", "torch", "date"}
    assert p["git_dirty"] is not None or p.get("backfilled") is True


def test_git_dirty_is_about_code_not_result_files(tmp_path):
    """A run that appended to a committed results file leaves the tree clean for the next run; a code edit does not."""
    import subprocess

    from agl._provenance import git_state

    def git(*a):
        subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "r.json").write_text("[]\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    assert git_state(tmp_path)["git_dirty"] is False
    (tmp_path / "bench" / "results" / "r.json").write_text("[{}]\n")
    assert git_state(tmp_path)["git_dirty"] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_state(tmp_path)["git_dirty"] is True
