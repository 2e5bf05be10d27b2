"""agl/_io.py: atomic writes keep the old file on failure and leave no temporaries; JSONL errors name the line."""
import json
import os
import stat

import pytest

from agl._io import atomic_output, atomic_write_json, atomic_write_text, iter_jsonl, read_jsonl, write_jsonl


def test_atomic_write_replaces_and_keeps_the_umask_mode(tmp_path):
    f = tmp_path / "sub" / "a.txt"
    atomic_write_text(f, "one")
    atomic_write_text(f, "two")
    assert f.read_text() == "two"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600
    assert os.listdir(f.parent) == ["a.txt"]


def test_atomic_output_keeps_the_old_file_when_the_writer_fails(tmp_path):
    f = tmp_path / "s.bin"
    f.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="writer died"):
        with atomic_output(f) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer died")
    assert f.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["s.bin"]


def test_atomic_write_json_serialises_numpy_and_result_objects(tmp_path):
    np = pytest.importorskip("numpy")

    class Result:
        def to_dict(self):
            return {"rate": np.float32(0.5)}

    atomic_write_json(tmp_path / "r.json", {"x": np.arange(3), "r": Result(), "s": {2, 1}})
    assert json.loads((tmp_path / "r.json").read_text()) == {"x": [0, 1, 2], "r": {"rate": 0.5}, "s": [1, 2]}


def test_jsonl_round_trip_and_line_numbers(tmp_path):
    f = tmp_path / "d.jsonl"
    write_jsonl(f, [{"a": 1}, {"b": "é"}])
    assert read_jsonl(f) == [{"a": 1}, {"b": "é"}]
    f.write_text('{"a": 1}\n\n{"b": 2}\n')
    assert list(iter_jsonl(f)) == [(1, {"a": 1}), (3, {"b": 2})]


@pytest.mark.parametrize("text, message", [
    ('{"a": 1}\nnot json\n{"b": 2}\n', "d.jsonl:2: not valid JSON"),
    ('{"a": 1}\n[1, 2]\n', "d.jsonl:2: expected a JSON object per line, got list"),
])
def test_bad_lines_name_file_and_line(tmp_path, text, message):
    f = tmp_path / "d.jsonl"
    f.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_jsonl(f)
    with pytest.raises(ValueError, match=message):  # a torn *tail* is tolerated, a bad line in the middle is not
        read_jsonl(f, tolerate_torn_tail=True)


def test_torn_tail_and_missing_file(tmp_path):
    f = tmp_path / "cache.jsonl"
    f.write_text('{"a": 1}\n{"b": 2}\n{"c": ')
    with pytest.raises(ValueError, match="cache.jsonl:3"):
        read_jsonl(f)
    assert read_jsonl(f, tolerate_torn_tail=True) == [{"a": 1}, {"b": 2}]
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_jsonl(tmp_path / "nope.jsonl")
    assert read_jsonl(tmp_path / "nope.jsonl", missing_ok=True) == []


def test_atomic_output_sets_the_umask_mode_on_a_file_the_writer_replaced(tmp_path):
    """A writer that swaps in a new 0600 file (as ``safetensors.save_file`` does) still yields a 0666-less-umask file."""
    f = tmp_path / "w.bin"
    with atomic_output(f) as tmp:
        os.unlink(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, b"data")
        os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    assert f.read_bytes() == b"data"
    assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask
