"""Hugging Face ``Trainer`` integration: a callback that logs the AGL terms."""
from __future__ import annotations

from transformers import TrainerCallback

__all__ = ["AGLLoggingCallback"]


class AGLLoggingCallback(TrainerCallback):
    """Adds the AGL terms, averaged since the previous log, to every ``Trainer`` log as ``agl/<term>``: every key of
    ``AGLLoss.last_terms`` but ``layers``, e.g. ``agl/align_nats`` (predicted rise of the alignment loss, nats per
    token), ``agl/lambda_align`` (the weight in force; in budget mode the multiplier's mean over the logged steps)
    and ``agl/share_align`` … (each term's fraction of the regulariser).

    ``Trainer(..., compute_loss_func=agl_loss.trainer_loss, callbacks=[AGLLoggingCallback(agl_loss)])``. The terms go
    into ``state.log_history`` and into the ``logs`` dict; reporters that run before this callback (the built-in
    wandb/tensorboard ones are added first) see them only if it is placed first:
    ``trainer.callback_handler.callbacks.insert(0, AGLLoggingCallback(agl_loss))``.
    """

    def __init__(self, agl_loss, prefix: str = "agl/"):
        self.agl_loss = agl_loss
        self.prefix = prefix

    def on_log(self, args, state, control, logs=None, **kwargs):
        terms = self.agl_loss.pop_running_means()
        if not terms or logs is None:
            return
        extra = {f"{self.prefix}{k}": v for k, v in terms.items()}
        logs.update(extra)
        if state.log_history and state.log_history[-1] is not logs:
            state.log_history[-1].update(extra)
