"""`agl fisher` end to end on a tiny Llama + character tokenizer saved to a local folder; bad input errors."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _tiny import tiny_llama  # noqa: E402

from agl.cli import main  # noqa: E402


def _char_tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_model")
    tiny_llama(lora=False).save_pretrained(d)
    _char_tokenizer().save_pretrained(d)
    return d


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_build_chat_batches_masks_prompt_and_pad():
    from agl.data import build_chat_batches

    tok = _char_tokenizer()
    b = build_chat_batches(tok, [{"prompt": "hi", "response": "yo!"}, {"prompt": "a", "response": "bcdef"}], 64, 2)[0]
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape
    ids, lab, mask = b["input_ids"][0], b["labels"][0], b["attention_mask"][0]
    n = int(mask.sum())
    assert tok.decode(ids[lab != -100]) .replace(" ", "") == "yo!</s>"
    assert (lab[n:] == -100).all() and (ids[n:] == tok.pad_token_id).all()
    # truncation keeps response tokens
    b = build_chat_batches(tok, [{"prompt": "x" * 50, "response": "y" * 50}], 20, 1)[0]
    assert b["input_ids"].shape[1] == 20 and (b["labels"] != -100).sum() >= 10


def test_cli_fisher_end_to_end(tmp_path, model_dir, capsys):
    data = _jsonl(tmp_path / "d.jsonl", [{"prompt": f"question {i}?", "response": f"answer {i} ok"} for i in range(5)])
    out = tmp_path / "state"
    rc = main(["fisher", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--max-samples", "4",
               "--batch-size", "3", "--max-length", "32", "--no-progress", "--fisher-dtype", "bfloat16",
               "--target-modules", "q_proj,v_proj"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "4 samples" in text and "self_attn.q_proj: 2 layer(s) 64x64" in text and "self_attn.v_proj" in text
    from agl.fisher import AlignmentState

    st = AlignmentState.load(out)
    assert len(st.layers) == 4 and st.num_samples == 4 and st.options["max_samples"] == 4
    assert all(ls.fisher.dtype == torch.bfloat16 for ls in st.layers.values())
    assert not st.has_cross
    rc = main(["fisher", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "cross"),
               "--max-samples", "4", "--batch-size", "3", "--max-length", "32", "--no-progress", "--cross-curvature"])
    assert rc == 0
    st = AlignmentState.load(tmp_path / "cross")
    assert st.has_cross and st.cross_samples == 4
    assert all(ls.C.shape == (4, ls.U.shape[1], ls.V.shape[1]) for ls in st.layers.values() if ls.U is not None)


@pytest.mark.parametrize(
    "rows, extra, message",
    [
        (None, [], "no such file"),
        ('{"prompt": "a"}\n', [], "d.jsonl:1: missing string field 'response'"),
        ('{"prompt": "a", "response": "b"}\nnot json\n', [], "d.jsonl:2: not valid JSON"),
        ('{"prompt": "a", "response": "b"}\n', ["--max-samples", "0"], "--max-samples must be >= 1"),
        ('{"prompt": "a", "response": "b"}\n', ["--target-modules", "nope_proj"], "--target-modules"),
    ],
)
def test_cli_bad_input_one_line(tmp_path, model_dir, capsys, rows, extra, message):
    data = tmp_path / "d.jsonl"
    if rows is not None:
        data.write_text(rows)
    rc = main(["fisher", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "o"), "--no-progress", *extra])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (transformers may print a weight-loading bar first)
    assert rc == 2 and message in err and err.startswith("agl fisher: error:")


def test_cli_bad_model(tmp_path, capsys):
    data = _jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}])
    rc = main(["fisher", "--model", str(tmp_path / "nowhere"), "--data", str(data), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--model" in err and "\n" not in err
