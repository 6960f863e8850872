"""Collapse diagnostics, as the study measures them.

cos_pos / cos_neg: mean cosine between the online projection z of one view and the target
projection z' of the other view, for the same image (positives) and for other images of the
mini-batch (negatives). Collapse shows as both near 1 (the study: 0.9999 without batch norm;
0.88 / 0.27 for BYOL). z_std: the standard deviation over the batch of the L2-normalised z,
averaged over dimensions: about 1/sqrt(d) when the outputs spread over the sphere, 0 collapsed.

The running sums stay on the device; only ``result()`` synchronises, once per epoch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def batch_stats(z: list[torch.Tensor], z_target: list[torch.Tensor]) -> torch.Tensor:
    """(cos_pos, cos_neg, z_std) for one step, averaged over both directions, as one tensor."""
    out = []
    for a, b in ((z[0], z_target[1]), (z[1], z_target[0])):
        a = F.normalize(a.float(), dim=1)
        b = F.normalize(b.float(), dim=1)
        sim = a @ b.T
        n = sim.shape[0]
        pos = sim.diagonal().mean()
        neg = (sim.sum() - sim.diagonal().sum()) / (n * (n - 1))
        out.append(torch.stack([pos, neg, a.std(dim=0).mean()]))
    return torch.stack(out).mean(dim=0)


class Collapse:
    """Accumulates ``batch_stats`` over an epoch without leaving the device."""

    names = ("cos_pos", "cos_neg", "z_std")

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.count = 0

    def update(self, stats: torch.Tensor) -> None:
        self.total = stats if self.total is None else self.total + stats
        self.count += 1

    def result(self) -> dict[str, float]:
        if self.total is None:
            return {}
        values = (self.total / self.count).tolist()
        self.total, self.count = None, 0
        return dict(zip(self.names, values, strict=True))


def trust_ratios(optimizer: torch.optim.Optimizer, online: nn.Module) -> dict[str, float]:
    """The last LARS trust ratio of every adapted tensor, by parameter name."""
    trust = getattr(optimizer, "trust", {})
    if not trust:
        return {}
    names = {id(p): n for n, p in online.named_parameters()}
    out: dict[str, float] = {}
    for index, ratios in trust.items():
        params = [p for p in optimizer.param_groups[index]["params"] if p.grad is not None]
        for p, r in zip(params, ratios.tolist(), strict=False):
            out[names.get(id(p), "?")] = r
    return out
