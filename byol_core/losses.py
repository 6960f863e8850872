"""BYOL's regression loss and the study's explicit contrastive (InfoNCE) alternative.

Both take the online predictions p = [p1, p2] and the target projections z' = [z'1, z'2] and
compare crosswise: view 1's prediction with view 2's target and vice versa ("we symmetrize the
loss by separately feeding v' to the online network and v to the target network", BYOL 3.1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def regression_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per-example 2 - 2 cos(p, z'): the squared distance of the L2-normalised vectors."""
    p, z = p.float(), z.detach().float()
    return 2.0 - 2.0 * F.cosine_similarity(p, z, dim=-1)


class BYOLLoss(nn.Module):
    """L + L~: the mean regression loss in both directions (range 0 to 8)."""

    def forward(self, p: list[torch.Tensor], z_target: list[torch.Tensor]) -> torch.Tensor:
        return regression_loss(p[0], z_target[1]).mean() + regression_loss(p[1], z_target[0]).mean()


class InfoNCELoss(nn.Module):
    """Cross-entropy of the positive pair against in-batch negatives and, when ``queue_size`` > 0,
    a MoCo-style queue of past target projections; both directions summed."""

    def __init__(self, dim: int, temperature: float = 0.2, queue_size: int = 0) -> None:
        super().__init__()
        self.temperature = temperature
        self.queue_size = queue_size
        if queue_size:
            self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def _direction(self, p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        p = F.normalize(p.float(), dim=1)
        z = F.normalize(z.detach().float(), dim=1)
        logits = p @ z.T
        if self.queue_size:
            logits = torch.cat([logits, p @ self.queue.T], dim=1)
        labels = torch.arange(p.shape[0], device=p.device)
        return F.cross_entropy(logits / self.temperature, labels)

    def forward(self, p: list[torch.Tensor], z_target: list[torch.Tensor]) -> torch.Tensor:
        loss = self._direction(p[0], z_target[1]) + self._direction(p[1], z_target[0])
        if self.queue_size:
            self._enqueue(torch.cat(z_target))
        return loss

    @torch.no_grad()
    def _enqueue(self, z: torch.Tensor) -> None:
        # More keys than slots: keep the newest.
        z = F.normalize(z.float(), dim=1)[-self.queue_size :]
        # Index arithmetic stays on the device: no host synchronisation in the step.
        idx = (self.queue_ptr + torch.arange(z.shape[0], device=z.device)) % self.queue_size
        self.queue.index_copy_(0, idx, z)
        self.queue_ptr.copy_((self.queue_ptr + z.shape[0]) % self.queue_size)


def build_loss(kind: str, dim: int, temperature: float, queue_size: int) -> nn.Module:
    if kind == "infonce":
        return InfoNCELoss(dim, temperature, queue_size)
    return BYOLLoss()
