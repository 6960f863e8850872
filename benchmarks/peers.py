"""The peer BYOL implementations, used as their own documentation uses them.

* lightly 1.6.0: the BYOL model and training step of lightly's documentation example
  (``BYOLProjectionHead``, ``BYOLPredictionHead``, ``update_momentum``,
  ``NegativeCosineSimilarity``, SGD), fp32 as written there.
* byol-pytorch 0.9.1 (lucidrains): its ``BYOL`` wrapper as its README uses it (``learner(images)``
  gives the loss, then ``update_moving_average()``), with an identity augmentation so that only
  the step is timed, and simplicial embeddings off.

Both are optional (the ``bench`` extra); a missing one stops the benchmark with one line.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from types import ModuleType

import torch
import torchvision
from torch import nn

INSTALL_HINT = "pip install -e '.[bench]'"
Step = Callable[[], None]


def require(module: str) -> ModuleType:
    """Import a peer or exit with one line saying how to install it."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        sys.exit(f"benchmarks: peer {module!r} is not installed; run: {INSTALL_HINT}")


# --- lightly ---------------------------------------------------------------------------------
class LightlyBYOL(nn.Module):
    """lightly's documentation BYOL model, with its heads sized as ours (512 -> 1024 -> 256)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        heads = require("lightly.models.modules")
        utils = require("lightly.models.utils")
        self.backbone = backbone
        self.projection_head = heads.BYOLProjectionHead(512, 1024, 256)
        self.prediction_head = heads.BYOLPredictionHead(256, 1024, 256)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        utils.deactivate_requires_grad(self.backbone_momentum)
        utils.deactivate_requires_grad(self.projection_head_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.backbone(x).flatten(start_dim=1)
        z = self.projection_head(y)
        return self.prediction_head(z)

    def forward_momentum(self, x: torch.Tensor) -> torch.Tensor:
        y = self.backbone_momentum(x).flatten(start_dim=1)
        z = self.projection_head_momentum(y)
        return z.detach()


def lightly_step(
    x0: torch.Tensor,
    x1: torch.Tensor,
    momentum: float = 0.99,
    prepare: Callable[[nn.Module], object] | None = None,
) -> Step:
    """A closure running one step of lightly's documentation loop on (x0, x1). ``prepare`` is
    called on the model before the optimizer is built (e.g. to change its memory format)."""
    utils = require("lightly.models.utils")
    loss_mod = require("lightly.loss")
    resnet = torchvision.models.resnet18()
    model = LightlyBYOL(nn.Sequential(*list(resnet.children())[:-1]))
    if prepare is not None:
        prepare(model)
    criterion = loss_mod.NegativeCosineSimilarity()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.06)

    def step() -> None:
        utils.update_momentum(model.backbone, model.backbone_momentum, m=momentum)
        utils.update_momentum(model.projection_head, model.projection_head_momentum, m=momentum)
        p0 = model(x0)
        z0 = model.forward_momentum(x0)
        p1 = model(x1)
        z1 = model.forward_momentum(x1)
        loss = 0.5 * (criterion(p0, z1) + criterion(p1, z0))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


# --- byol-pytorch ----------------------------------------------------------------------------
def byol_pytorch_step(images: torch.Tensor, momentum: float = 0.99) -> Step:
    """A closure running one step of byol-pytorch's README loop on ``images``.

    Its ``BYOL`` augments the batch twice itself; with the identity the two views are the same
    images, which costs exactly what two different views cost (one concatenated 2B pass).
    """
    lib = require("byol_pytorch")
    kwargs = dict(
        image_size=images.shape[-1],
        hidden_layer="avgpool",
        projection_size=256,
        projection_hidden_size=1024,
        augment_fn=nn.Identity(),
        moving_average_decay=momentum,
    )
    try:
        learner = lib.BYOL(torchvision.models.resnet18(), use_simplicial_embeddings=False, **kwargs)
    except TypeError:  # a version without the option has none to switch off
        learner = lib.BYOL(torchvision.models.resnet18(), **kwargs)
    optimizer = torch.optim.Adam(learner.parameters(), lr=3e-4)

    def step() -> None:
        loss = learner(images)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        learner.update_moving_average()

    return step
