"""agl.hf.attach with transformers.Trainer and trl.SFTTrainer(peft_config=...) on a tiny Llama built in code:
one forward per micro-batch, the budget stepped and the terms logged once per optimiser step under gradient
accumulation, scalars seen by the callbacks after it, and λ_A restored by resume_from_checkpoint."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from _tiny import tiny_batches, tiny_llama
from agl.fisher import estimate_alignment_state
from agl.loss import AGLConfig

pytest.importorskip("accelerate")
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import agl.hf  # noqa: E402

CFG = AGLConfig(backend="torch", lambda_align=1.0, lambda_task=0.0, lambda_collision=0.0, align_budget=3e-5)
ROWS, T = 16, 10
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def state():
    return estimate_alignment_state(tiny_llama(), tiny_batches(6, 3), progress=False)


def _rows():
    """Equal-length sequences without padding: every micro-batch counts the same tokens, so k micro-batches of b rows
    make exactly the loss of one batch of k·b rows."""
    g = torch.Generator().manual_seed(5)
    return [torch.randint(4, 128, (T,), generator=g).tolist() for _ in range(ROWS)]


class Recorder(TrainerCallback):
    """Stands in for a reporter (TensorBoard, wandb): what it receives in on_log."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, **{f"w{i}": i for i in range(4, 128)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def _trainer(kind: str, out, *, k: int, bs: int, steps: int, save_steps=None):
    """A Trainer on tiny_llama's peft model, or an SFTTrainer that builds the peft model itself (peft_config)."""
    common = dict(output_dir=str(out), max_steps=steps, per_device_train_batch_size=bs, gradient_accumulation_steps=k,
                  learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                  save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
                  lr_scheduler_type="constant")
    rec = Recorder()
    if kind == "trainer":
        from torch.utils.data import Dataset

        rows = [{"input_ids": torch.tensor(r), "attention_mask": torch.ones(T, dtype=torch.long),
                 "labels": torch.tensor(r)} for r in _rows()]

        class DS(Dataset):
            def __len__(self):
                return len(rows)

            def __getitem__(self, i):
                return rows[i]

        tr = Trainer(model=tiny_llama(), args=TrainingArguments(**common), train_dataset=DS(), callbacks=[rec])
    else:
        trl = pytest.importorskip("trl")
        from datasets import Dataset
        from peft import LoraConfig

        from _tiny import TARGETS

        args = trl.SFTConfig(**common, max_length=None, packing=False)
        tr = trl.SFTTrainer(model=tiny_llama(lora=False), args=args, processing_class=_tokenizer(),
                            train_dataset=Dataset.from_dict({"input_ids": _rows()}), callbacks=[rec],
                            peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
    return tr, rec


def _train_logs(tr, rec, **kw):
    tr.train(**kw)
    return [h for h in rec.logs if "loss" in h]


@pytest.mark.parametrize("kind", ["trainer", "sft"])
def test_accumulation_logs_and_lambda_per_optimizer_step(kind, state, tmp_path):
    """k = 4 micro-batches of 1 row vs k = 1 batch of 4 rows: one forward per micro-batch, the same λ_A and task loss
    per optimiser step; the reporter sees agl/* in every log; agl/total is the Trainer's loss."""
    runs = {}
    for k, bs in ((1, 4), (4, 1)):
        tr, rec = _trainer(kind, tmp_path / f"k{k}", k=k, bs=bs, steps=4)
        L = agl.hf.attach(tr, state, CFG)
        assert type(tr.callback_handler.callbacks[0]).__name__ == "AGLLoggingCallback"
        calls = []
        L.model.register_forward_hook(lambda *a: calls.append(1))
        runs[k] = _train_logs(tr, rec)
        assert len(calls) == 4 * k  # no extra forward
    for logs in runs.values():
        assert len(logs) == 4 and all("agl/align_nats" in h and "agl/lambda_align" in h for h in logs)
        for h in logs:
            assert h["agl/total"] == pytest.approx(h["loss"], rel=1e-5)
            assert h["agl/task_loss"] + h["agl/regularizer"] == pytest.approx(h["loss"], rel=1e-5)
    lam1, lam4 = ([h["agl/lambda_align"] for h in runs[k]] for k in (1, 4))
    assert lam1 == pytest.approx(lam4, rel=1e-4) and lam1[0] == 1.0 and lam1[-1] > 2.0  # once per step, and it moved
    assert [h["agl/task_loss"] for h in runs[4]] == pytest.approx([h["agl/task_loss"] for h in runs[1]], rel=1e-4)


@pytest.mark.parametrize("kind", ["trainer", "sft"])
def test_resume_from_checkpoint_restores_lambda(kind, state, tmp_path):
    """Stop after a checkpoint at step 3, resume from it in a fresh trainer: steps 4-6 use the λ_A of the run that
    never stopped; without the saved state (an old checkpoint) λ_A restarts at λ0, with a warning."""
    tr, rec = _trainer(kind, tmp_path / "full", k=2, bs=2, steps=6, save_steps=3)
    full_loss = agl.hf.attach(tr, state, CFG)
    full = _train_logs(tr, rec)
    ckpt = tmp_path / "full" / "checkpoint-3"
    assert (ckpt / agl.hf.CHECKPOINT_FILE).is_file()

    tr2, rec2 = _trainer(kind, tmp_path / "full", k=2, bs=2, steps=6, save_steps=3)
    resumed_loss = agl.hf.attach(tr2, state, CFG)
    resumed = _train_logs(tr2, rec2, resume_from_checkpoint=str(ckpt))
    lam = lambda logs: [h["agl/lambda_align"] for h in logs]  # noqa: E731
    assert len(resumed) == 3 and lam(resumed) == pytest.approx(lam(full)[3:], rel=1e-6)
    assert lam(full)[3] > 2.0 and resumed_loss.lambda_align == pytest.approx(full_loss.lambda_align, rel=1e-6)

    os.remove(ckpt / agl.hf.CHECKPOINT_FILE)
    tr3, rec3 = _trainer(kind, tmp_path / "full", k=2, bs=2, steps=6, save_steps=3)
    agl.hf.attach(tr3, state, CFG)
    with pytest.warns(UserWarning, match="restarts at its initial"):
        fresh = _train_logs(tr3, rec3, resume_from_checkpoint=str(ckpt))
    assert lam(fresh)[0] == 1.0


def test_attach_errors_and_eval_loss(state, tmp_path):
    """Attaching twice or on top of compute_loss_func=trainer_loss is refused; evaluation gets the task loss alone
    and leaves the budget controller alone."""
    tr, _ = _trainer("trainer", tmp_path, k=1, bs=2, steps=1)
    L = agl.hf.attach(tr, state, dataclasses.replace(CFG, lambda_align=1e4))
    with pytest.raises(ValueError, match="already has an AGL regulariser"):
        agl.hf.attach(tr, state, CFG)
    with torch.no_grad():
        L.entries[0].B.add_(0.05)  # a non-zero update, so the regulariser is > 0
    b = {k: v[:2] for k, v in tiny_batches(2, 2)[0].items()}
    tr.model.eval()
    before = L.state_dict()
    with torch.no_grad():
        ev = tr.compute_loss(tr.model, dict(b))
        task = tr.model(**b).loss
    assert float(ev) == float(task) and L.state_dict() == before
    tr.model.train()
    train = tr.compute_loss(tr.model, dict(b))  # k = 1, a per-batch mean: the regulariser at full weight
    reg = L.last_terms["regularizer"]
    assert reg > 1e-3 and float(train.detach()) == pytest.approx(float(task) + reg, rel=1e-6)
    tr2 = Trainer(model=tr.model, args=TrainingArguments(output_dir=str(tmp_path / "b"), report_to=[], use_cpu=True),
                  compute_loss_func=L.trainer_loss)
    with pytest.raises(ValueError, match="compute_loss_func"):
        agl.hf.attach(tr2, state, CFG)


def test_checkpoint_file_is_the_state_dict(state, tmp_path):
    tr, _ = _trainer("trainer", tmp_path, k=1, bs=2, steps=2, save_steps=2)
    L = agl.hf.attach(tr, state, CFG)
    tr.train()
    saved = json.loads((tmp_path / "checkpoint-2" / agl.hf.CHECKPOINT_FILE).read_text())
    assert saved == L.state_dict() and saved["budget"]["window_n"] == 0  # saved after the step closed its window
