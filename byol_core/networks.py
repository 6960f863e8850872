"""The networks: a torchvision ResNet encoder with the study's normalisation options, and MLP heads.

The encoder options cover the appendix's batch-norm-free runs: GroupNorm with weight
standardisation (Qiao et al. 2019), as used in "BYOL works even without batch statistics".
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torchvision.models import resnet

from byol_core.small_map_conv import SmallMapConv2d, conv_args, small_map_convs
from byol_core.spec import EncoderSpec, MLPSpec
from byol_core.view_bn import BatchNorm1d, BatchNorm2d


class WSConv2d(SmallMapConv2d):
    """Conv2d with weight standardisation: each filter is normalised to zero mean and unit
    variance before the convolution, which keeps the loss surface smooth without batch norm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        var, mean = torch.var_mean(w, dim=(1, 2, 3), keepdim=True, correction=0)
        w = (w - mean) * torch.rsqrt(var + 1e-5)
        return self._conv_forward(x, w, self.bias)


def _encoder_norm(kind: str, groups: int) -> type[nn.Module] | partial[nn.Module]:
    if kind == "batch":
        return BatchNorm2d
    if kind in ("group", "group_ws"):
        return partial(nn.GroupNorm, groups)
    # torchvision's ResNet needs a norm layer; Identity accepts and ignores the channel count.
    return lambda _channels: nn.Identity()


def build_encoder(spec: EncoderSpec) -> nn.Module:
    """A torchvision ResNet without its classifier (``fc`` is Identity); ``out_dim`` says its width.

    ``width`` scales every stage (64 is torchvision's); ``small_stem`` replaces the 7x7/2 conv and
    max-pool with a 3x3/1 conv, the usual stem for 32-96 px images.
    """
    block, layers = {
        "resnet18": (resnet.BasicBlock, [2, 2, 2, 2]),
        "resnet50": (resnet.Bottleneck, [3, 4, 6, 3]),
    }[spec.arch]
    net = resnet.ResNet(block, layers, norm_layer=_encoder_norm(spec.norm, spec.groups))
    if spec.width != 64:
        net = _rewidth(net, block, layers, spec)
    if spec.small_stem:
        net.conv1 = nn.Conv2d(3, spec.width, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    if spec.norm == "group_ws":
        _standardise_convs(net)
    small_map_convs(net)
    net.out_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net


def _rewidth(net: resnet.ResNet, block, layers: list[int], spec: EncoderSpec) -> resnet.ResNet:
    # torchvision hard-codes 64 base channels; rebuilding the stages is the supported way to
    # change it (width_per_group only widens Bottleneck interiors).
    norm = _encoder_norm(spec.norm, spec.groups)
    net.inplanes = spec.width
    net.conv1 = nn.Conv2d(3, spec.width, 7, 2, 3, bias=False)
    net.bn1 = norm(spec.width)
    for i, n in enumerate(layers):
        stride = 1 if i == 0 else 2
        setattr(net, f"layer{i + 1}", net._make_layer(block, spec.width * 2**i, n, stride))
    net.fc = nn.Linear(spec.width * 8 * block.expansion, 1)
    _init_like_torchvision(net)
    return net


def _init_like_torchvision(net: nn.Module) -> None:
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _standardise_convs(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d) and not isinstance(child, WSConv2d):
            ws = WSConv2d(*conv_args(child))
            ws.load_state_dict(child.state_dict())
            setattr(module, name, ws)
        else:
            _standardise_convs(child)


def _mlp_norm(spec: MLPSpec) -> nn.Module:
    dim = spec.hidden_dim
    return {
        "batch": lambda: BatchNorm1d(dim),
        "layer": lambda: nn.LayerNorm(dim),
        "group": lambda: nn.GroupNorm(spec.groups, dim),
        "none": nn.Identity,
    }[spec.norm]()


class MLP(nn.Sequential):
    """Linear -> norm -> ReLU -> Linear: "a multi-layer perceptron (MLP) with a hidden layer ...
    followed by batch normalization, rectified linear units (ReLU), and a final linear layer"
    (BYOL paper, section 3.3). The study varies only ``norm``."""

    def __init__(self, in_dim: int, out_dim: int, spec: MLPSpec) -> None:
        super().__init__(
            nn.Linear(in_dim, spec.hidden_dim),
            _mlp_norm(spec),
            nn.ReLU(inplace=True),
            nn.Linear(spec.hidden_dim, out_dim),
        )
