"""The target network's exponential moving average, xi <- tau xi + (1 - tau) theta."""

from __future__ import annotations

import torch


@torch.no_grad()
def ema_update(target: list[torch.Tensor], online: list[torch.Tensor], tau: float) -> None:
    """One fused update over all parameters (``lerp``: xi + (1 - tau)(theta - xi)).

    Call it after the optimizer step, with the parameters of the unwrapped online network.
    """
    torch._foreach_lerp_(target, online, 1.0 - tau)
