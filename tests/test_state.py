"""AlignmentState files carry a sha256 per tensor: a changed byte fails to load, older files load with a warning."""
from __future__ import annotations

import json
import struct
import warnings

import pytest
import torch

from agl.state import AlignmentState, LayerState, tensor_digest


def small_state(fisher_dtype_seed: int = 0) -> AlignmentState:
    g = torch.Generator().manual_seed(fisher_dtype_seed)
    layers = {
        "model.layers.0.q_proj": LayerState(torch.rand(6, 5, generator=g) + 0.5,
                                            torch.linalg.qr(torch.randn(6, 2, generator=g))[0],
                                            torch.linalg.qr(torch.randn(5, 3, generator=g))[0]),
        "model.layers.0.v_proj": LayerState(torch.rand(4, 5, generator=g) + 0.5, None, None),
    }
    return AlignmentState(layers, num_samples=7, fisher_scale=0.25, options={"fisher": "empirical"})


def data_span(path, tensor: str):
    """(start, end) byte offsets of ``tensor``'s data in a safetensors file (8-byte header length, JSON header,
    then the data block the header's ``data_offsets`` point into)."""
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    a, b = header[tensor]["data_offsets"]
    return 8 + n + a, 8 + n + b


def rewrite_header(path, edit) -> None:
    """Apply ``edit`` to the file's ``agl`` header JSON in place (same tensors, same data bytes)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["agl"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(meta)
    save_file(tensors, str(path), metadata={"agl": json.dumps(meta, sort_keys=True)})


@pytest.mark.parametrize("fisher_dtype", [torch.float32, torch.bfloat16])
def test_round_trip_records_and_verifies_checksums(tmp_path, fisher_dtype):
    st = small_state()
    path = st.save(tmp_path / "s", fisher_dtype=fisher_dtype)
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()["agl"])
        assert set(meta["sha256"]) == set(f.keys()) == {
            "model.layers.0.q_proj/fisher", "model.layers.0.q_proj/U", "model.layers.0.q_proj/V",
            "model.layers.0.v_proj/fisher"}
        for k in f.keys():
            assert meta["sha256"][k] == tensor_digest(k, f.get_tensor(k))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a checked file loads without a warning
        back = AlignmentState.load(tmp_path / "s")
    for name, ls in st.layers.items():
        assert torch.equal(back.layers[name].fisher, ls.fisher.to(fisher_dtype))
        for key in ("U", "V"):
            a, b = getattr(back.layers[name], key), getattr(ls, key)
            assert (a is None and b is None) or torch.equal(a, b)


def test_flipped_bit_in_the_fisher_fails_to_load(tmp_path):
    path = small_state().save(tmp_path / "s.safetensors")
    start, end = data_span(path, "model.layers.0.q_proj/fisher")
    raw = bytearray(open(path, "rb").read())
    raw[start + (end - start) // 2] ^= 0x01  # one mantissa bit of one Fisher entry: still a valid float
    open(path, "wb").write(bytes(raw))
    with pytest.raises(ValueError) as err:
        AlignmentState.load(path)
    msg = str(err.value)
    assert str(path) in msg and "corrupt" in msg
    assert "model.layers.0.q_proj/fisher" in msg
    assert "model.layers.0.v_proj/fisher" not in msg and "q_proj/U" not in msg  # only the changed tensor is named


def test_digest_covers_name_dtype_and_shape():
    t = torch.arange(6, dtype=torch.float32)
    d = tensor_digest("a/fisher", t)
    assert d == tensor_digest("a/fisher", t.clone())
    assert d != tensor_digest("b/fisher", t)
    assert d != tensor_digest("a/fisher", t.view(2, 3))
    assert d != tensor_digest("a/fisher", t.view(torch.int32))  # same bytes, another dtype


def test_header_and_file_must_list_the_same_tensors(tmp_path):
    path = small_state().save(tmp_path / "s.safetensors")
    rewrite_header(path, lambda m: m["sha256"].pop("model.layers.0.q_proj/U"))
    with pytest.raises(ValueError, match=r"q_proj/U: in the file, not in the header's checksum"):
        AlignmentState.load(path)


def test_file_without_checksum_loads_with_a_warning(tmp_path):
    st = small_state()
    path = st.save(tmp_path / "old.safetensors")
    rewrite_header(path, lambda m: m.pop("sha256"))  # the format agl wrote before checksums
    with pytest.warns(UserWarning, match="no tensor checksum"):
        back = AlignmentState.load(path)
    assert torch.equal(back.layers["model.layers.0.q_proj"].fisher, st.layers["model.layers.0.q_proj"].fisher)
    assert back.num_samples == 7 and back.fisher_scale == 0.25
