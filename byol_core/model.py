"""BYOL's two networks: the online network (encoder -> projector -> predictor) and the target
network, an exponential moving average of the online encoder and projector.

They are separate modules so that a distributed wrapper (DDP) can wrap the online network alone;
the target never receives gradients and is updated from the unwrapped online network.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from byol_core.networks import MLP, build_encoder
from byol_core.spec import ModelSpec


def _per_view(
    net: Callable[[torch.Tensor], torch.Tensor], views: list[torch.Tensor], concat: bool
) -> list[torch.Tensor]:
    # Separate passes give each view its own batch-norm statistics, as the reference
    # implementations do; one concatenated pass shares them (and is faster).
    if concat:
        return list(net(torch.cat(views)).chunk(len(views)))
    return [net(v) for v in views]


class Online(nn.Module):
    """f_theta, g_theta and q_theta: encoder, projector and predictor."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.encoder = build_encoder(spec.encoder)
        self.projector = MLP(self.encoder.out_dim, spec.projection_dim, spec.projector)
        self.predictor = MLP(spec.projection_dim, spec.projection_dim, spec.predictor)
        self.concat_views = spec.concat_views

    def forward(self, views: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Projections z and predictions p for every view, in one call (DDP needs one forward)."""
        z = _per_view(self.project, views, self.concat_views)
        p = _per_view(self.predictor, z, self.concat_views)
        return z, p

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(x))


class Target(nn.Module):
    """f_xi and g_xi: the target encoder and projector, xi <- tau xi + (1 - tau) theta.

    The target runs with batch norm in training mode, as in every reference implementation: its
    projections are normalised with the current batch's statistics. Only parameters are averaged;
    the target's BN running statistics are its own (updated by its own forward passes) and are
    used only if someone evaluates the target in eval mode.
    """

    def __init__(self, online: Online) -> None:
        super().__init__()
        self.encoder = copy.deepcopy(online.encoder)
        self.projector = copy.deepcopy(online.projector)
        self.concat_views = online.concat_views
        self.requires_grad_(False)

    @torch.no_grad()
    def forward(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        return _per_view(self.project, views, self.concat_views)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(x))


class BYOL(nn.Module):
    """Both networks, for building, checkpointing and evaluation; training steps take the parts."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.online = Online(spec)
        self.target = Target(self.online)

    def target_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(target params, matching online params) in the same order, for the EMA update."""
        target = [*self.target.encoder.parameters(), *self.target.projector.parameters()]
        online = [*self.online.encoder.parameters(), *self.online.projector.parameters()]
        return target, online
