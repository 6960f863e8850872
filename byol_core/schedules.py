"""Per-step schedules as pure functions of the step k out of K total steps."""

from __future__ import annotations

import math


def learning_rate(
    step: int, total_steps: int, base_lr: float, warmup_steps: int = 0, schedule: str = "cosine"
) -> float:
    """Linear warm-up from 0 to ``base_lr`` over ``warmup_steps``, then cosine decay to 0
    ("a cosine decay learning rate schedule ... with a warm-up period of 10 epochs", BYOL B.1)."""
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def scaled_lr(base_lr: float, global_batch: int, scale: bool = True) -> float:
    """``lr = base_lr x BatchSize / 256`` (BYOL B.1)."""
    return base_lr * global_batch / 256 if scale else base_lr


def target_decay(step: int, total_steps: int, tau_base: float, schedule: str = "cosine") -> float:
    """tau = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2: from tau_base at k = 0 to 1 at k = K."""
    if schedule == "constant" or total_steps <= 0:
        return tau_base
    progress = min(1.0, step / total_steps)
    return 1.0 - (1.0 - tau_base) * (math.cos(math.pi * progress) + 1.0) / 2.0
