"""BYOL's two networks: the online network (encoder -> projector -> predictor) and the target
network, an exponential moving average of the online encoder and projector.

They are separate modules so that a distributed wrapper (DDP) can wrap the online network alone;
the target never receives gradients and is updated from the unwrapped online network.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from byol_core.networks import MLP, build_encoder
from byol_core.spec import ModelSpec
from byol_core.sync_bn import synchronises_batch_norm
from byol_core.view_bn import view_groups

ViewPasses = Literal["auto", "one", "separate"]


def _view_passes(
    module: nn.Module,
    nets: list[Callable[[torch.Tensor], torch.Tensor]],
    views: list[torch.Tensor],
    concat: bool,
    passes: ViewPasses,
) -> list[list[torch.Tensor]]:
    """The views through ``nets`` in sequence (each net's output feeds the next); for each net
    its outputs, one per view.

    Batch norm sees each view with its own statistics, as the reference implementations run
    the views through separately. ``one``: the views go through as one batch in which every
    batch norm of ``module`` normalises each view's chunk with the chunk's own statistics
    (``view_bn``), the same computation with every layer called once; under global batch norm
    that halves the collectives. ``separate``: a pass per view. ``auto`` takes one pass when
    batch statistics are synchronised across processes and a pass per view otherwise, which
    measured faster on CPU here (docs/benchmark-distributed.md). ``concat`` shares the
    statistics across views instead: another method.
    """
    if passes == "auto":
        passes = "one" if synchronises_batch_norm(module) else "separate"
    if passes == "separate" and not concat:
        outs: list[list[torch.Tensor]] = []
        xs = views
        for net in nets:
            xs = [net(x) for x in xs]
            outs.append(xs)
        return outs
    x = torch.cat(views)
    outs = []
    with view_groups(module, 1 if concat else len(views)):
        for net in nets:
            x = net(x)
            outs.append(list(x.chunk(len(views))))
    return outs


class Online(nn.Module):
    """f_theta, g_theta and q_theta: encoder, projector and predictor."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.encoder = build_encoder(spec.encoder)
        self.projector = MLP(self.encoder.out_dim, spec.projection_dim, spec.projector)
        self.predictor = MLP(spec.projection_dim, spec.projection_dim, spec.predictor)
        self.concat_views = spec.concat_views
        # How the views go through (see _view_passes): the same computation either way; tests
        # and benchmarks set it, training leaves it to "auto".
        self.view_passes: ViewPasses = "auto"

    def forward(self, views: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Projections z and predictions p for every view, in one call (DDP needs one forward)."""
        z, p = _view_passes(
            self, [self.project, self.predictor], views, self.concat_views, self.view_passes
        )
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
        self.view_passes: ViewPasses = online.view_passes
        self.requires_grad_(False)

    @torch.no_grad()
    def forward(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        (z,) = _view_passes(self, [self.project], views, self.concat_views, self.view_passes)
        return z

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
