"""`agl driftcaps`: help, one-line errors, an end-to-end run on a tiny local model, compare and reduction."""
from __future__ import annotations

import json

import pytest

from agl.cli import main
from agl.driftcaps import DriftReport

from _dc_tiny import TINY_PROMPTS


def run(capsys, *argv):
    code = main(["driftcaps", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["compare", "--help"], ["reduction", "--help"]])
def test_help(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(["driftcaps", *argv])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out
    if argv[0] == "run":
        for opt in ("--model", "--adapter", "--prompts", "--split", "--limit", "--max-new-tokens", "--batch-size",
                    "--device", "--out", "--judge"):
            assert opt in out
        assert "smollm2-135m-instruct" in out and "AdvBench" in out


def test_no_subcommand_prints_help(capsys):
    code, out, _ = run(capsys)
    assert code == 2 and "run" in out and "compare" in out


def _one_line_error(code, err):
    assert code != 0
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("agl driftcaps: error:")
    return lines[0]


def test_run_missing_prompt_file(capsys, tmp_path):
    code, _, err = run(capsys, "run", "--model", "smollm2-135m-instruct", "--prompts", str(tmp_path / "x.csv"),
                       "--out", str(tmp_path / "o"))
    assert "not found" in _one_line_error(code, err)


def test_run_unknown_format(capsys, tmp_path):
    f = tmp_path / "p.csv"
    f.write_text("a,b\n1,2\n")
    code, _, err = run(capsys, "run", "--model", "x", "--prompts", str(f), "--out", str(tmp_path / "o"))
    assert "unknown CSV format" in _one_line_error(code, err)


@pytest.mark.parametrize("model", ["some-org/some-hub-model", "/no/such/dir", "not-a-model.gguf"])
def test_run_unloadable_model(capsys, tmp_path, model):
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps(p) for p in TINY_PROMPTS) + "\n")
    code, _, err = run(capsys, "run", "--model", model, "--prompts", str(f), "--out", str(tmp_path / "o"))
    line = _one_line_error(code, err)
    assert "--model" in line


def test_run_broken_model_dir(capsys, tmp_path):
    d = tmp_path / "broken"
    d.mkdir()
    (d / "config.json").write_text("{not json")
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps(p) for p in TINY_PROMPTS) + "\n")
    code, _, err = run(capsys, "run", "--model", str(d), "--prompts", str(f), "--out", str(tmp_path / "o"))
    assert "cannot load" in _one_line_error(code, err)


def test_run_bad_numbers(capsys, tmp_path):
    code, _, err = run(capsys, "run", "--model", "x", "--limit", "0", "--out", str(tmp_path))
    assert "--limit" in _one_line_error(code, err)


def test_run_end_to_end_then_compare(capsys, tmp_path, tiny_model_dir):
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps(p) for p in TINY_PROMPTS) + "\n")
    out = tmp_path / "run"
    code, stdout, err = run(capsys, "run", "--model", str(tiny_model_dir), "--prompts", str(f), "--out", str(out),
                            "--max-new-tokens", "4", "--batch-size", "3", "--no-progress")
    assert code == 0, err
    assert "RR_unsafe" in stdout
    for name in ("report.json", "report.md", "report.png", "generations.jsonl"):
        assert (out / name).is_file()
    assert not list(out.glob(".*tmp"))  # atomic writes leave no temporaries
    rep = DriftReport.from_json(out / "report.json")
    assert len(rep.records) == 8 and rep.meta["model"] == str(tiny_model_dir)
    # rerun: everything from the cache
    code, stdout, _ = run(capsys, "run", "--model", str(tiny_model_dir), "--prompts", str(f), "--out", str(out),
                          "--max-new-tokens", "4", "--no-progress")
    assert code == 0 and "(8 from cache)" in stdout

    # compare against a hand-edited "after" report in which every unsafe prompt is complied with
    d = json.loads((out / "report.json").read_text())
    for r in d["records"]:
        if r["label"] == "unsafe":
            r["refused"] = False
    after = tmp_path / "after.json"
    after.write_text(json.dumps(d))
    code, stdout, err = run(capsys, "compare", str(out / "report.json"), str(after), "--out", str(tmp_path / "cmp"))
    assert code == 0, err
    before_rr = rep.metrics["rr_unsafe"]["rate"]
    assert f"{100 * before_rr:+.1f} pp" in stdout and "McNemar" in stdout
    for name in ("comparison.json", "comparison.md", "comparison.png"):
        assert (tmp_path / "cmp" / name).is_file()
    c = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert c["drift"]["value"] == pytest.approx(before_rr)

    code, stdout, err = run(capsys, "reduction", str(out / "report.json"), str(after), str(out / "report.json"))
    assert code == 0, err
    if before_rr > 0:
        assert json.loads(stdout)["value"] == pytest.approx(1.0)


def test_compare_bad_inputs(capsys, tmp_path):
    code, _, err = run(capsys, "compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"))
    assert "not found" in _one_line_error(code, err)
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    code, _, err = run(capsys, "compare", str(bad), str(bad))
    assert "not a JSON report" in _one_line_error(code, err)
    other = tmp_path / "other.json"
    other.write_text('{"hello": 1}')
    code, _, err = run(capsys, "compare", str(other), str(other))
    assert "not a DriftCaps report" in _one_line_error(code, err)
