"""The trainer's hooks: where tests and extensions plug in without touching the loop.

Subclass `Callback`, override what you need, pass instances to `Trainer(cfg, callbacks=[...])`.
Every rank calls every hook, at the same points of the loop; `trainer` is the calling
megatrain.train.Trainer (its step, plan, engine, loader, metrics, guard...).
"""

from __future__ import annotations

from pathlib import Path


class Callback:
    def on_start(self, trainer) -> None:
        """Everything is built and restored; the first step is next."""

    def on_step_end(self, trainer, loss: float, skipped: bool) -> None:
        """An optimizer step is done (`trainer.step` counts it); `loss` is its mean over ranks."""

    def on_log(self, trainer, record: dict) -> None:
        """A metrics record was written (with `val_loss` when the evaluator ran)."""

    def on_checkpoint(self, trainer, path: Path) -> None:
        """A complete checkpoint was saved at `path`."""

    def on_close(self, trainer, error: BaseException | None) -> None:
        """The loop ended: normally (`error` None) or by an exception, raised again after this."""
