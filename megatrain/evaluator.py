"""Validation loss on held-out samples, on its own cadence."""

from __future__ import annotations

import math

import torch

from megatrain import dist
from megatrain.data import IGNORE_INDEX, Batch


class Evaluator:
    """The mean validation loss per token over every rank's share of a fixed validation set
    (megatrain.data.validation_batches), every `every` steps and at the end of the run."""

    def __init__(self, engine, batches: list[Batch], every: int, device: torch.device):
        self.engine, self.batches, self.every, self.device = engine, batches, every, device

    def due(self, step: int, final: bool) -> bool:
        return final or bool(self.every and step % self.every == 0)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """{"val_loss", "val_ppl"}, the same on every rank (collective)."""
        self.engine.eval()
        loss_sum, count = 0.0, 0
        for b in self.batches:
            loss = self.engine(b.inputs.to(self.device), b.targets.to(self.device))
            n = int((b.targets != IGNORE_INDEX).sum())
            if n:
                loss_sum, count = loss_sum + float(loss) * n, count + n
        self.engine.train()
        sums = dist.all_reduce({"loss": loss_sum, "tokens": count})
        val_loss = sums["loss"] / max(sums["tokens"], 1)
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}
