"""AdamW with weight-decay groups, and the learning-rate schedule.

The schedule is a pure function of the step, so a resumed run needs nothing but the step
number to continue on the same curve.
"""

from __future__ import annotations

import math

import torch

from megatrain.config import OptimConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (linear and embedding weights); leave norms and biases alone, as GPT-2
    and LLaMA do."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class AdamW(torch.optim.AdamW):
    """torch's AdamW; with `skip_nonfinite`, it leaves out a step whose gradients are not all
    finite: parameters and moments stay exactly as they were, and `skipped_steps` counts it.

    ZeRO's optimizers (and DeepSpeed's bf16 and fp16 ones) discard such a step themselves; fp32
    without ZeRO has no wrapper, so there this optimizer does it. (Gradients are averaged over
    the ranks before the step, so every rank decides alike.)
    """

    def __init__(self, params, skip_nonfinite: bool = False, **kwargs):
        super().__init__(params, **kwargs)
        self.skip_nonfinite, self.skipped_steps = skip_nonfinite, 0

    @torch.no_grad()
    def step(self, closure=None):
        if self.skip_nonfinite:
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            if grads and not torch.stack([torch.isfinite(g).all() for g in grads]).all():
                self.skipped_steps += 1
                return None
        return super().step(closure)


def build_optimizer(
    model: torch.nn.Module, cfg: OptimConfig, device: torch.device, skip_nonfinite: bool = False
) -> AdamW:
    # torch's AdamW, fused on GPU; on CPU DeepSpeed's own Adam would JIT-compile an op for minutes
    return AdamW(
        param_groups(model, cfg.weight_decay),
        skip_nonfinite=skip_nonfinite,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=device.type == "cuda",
    )


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then decay to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    decay_steps = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    if cfg.schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        factor = 1.0 - progress
    return cfg.min_lr + factor * (cfg.lr - cfg.min_lr)
