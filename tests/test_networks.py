import pytest
import torch
from torch import nn

from byol_core import view_bn
from byol_core.model import BYOL
from byol_core.networks import MLP, WSConv2d, build_encoder
from byol_core.presets import resolve_spec
from byol_core.spec import EncoderSpec, MLPSpec


def count(module: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in module.modules())


@pytest.mark.parametrize(("arch", "width", "dim"), [("resnet18", 16, 128), ("resnet50", 8, 256)])
def test_encoder_width_and_output_dim(arch, width, dim):
    enc = build_encoder(EncoderSpec(arch=arch, width=width))
    assert enc.out_dim == dim
    assert enc(torch.randn(2, 3, 32, 32)).shape == (2, dim)


def test_small_stem_keeps_resolution_and_standard_stem_matches_torchvision():
    small = build_encoder(EncoderSpec(width=64, small_stem=True))
    assert small.conv1.kernel_size == (3, 3) and isinstance(small.maxpool, nn.Identity)
    std = build_encoder(EncoderSpec(width=64, small_stem=False))
    import torchvision

    ref = torchvision.models.resnet18()
    assert sum(p.numel() for p in std.parameters()) == sum(
        p.numel() for n, p in ref.named_parameters() if not n.startswith("fc.")
    )


def test_encoder_norm_options():
    gn_ws = build_encoder(EncoderSpec(width=16, norm="group_ws", groups=8))
    assert count(gn_ws, nn.BatchNorm2d) == 0 and count(gn_ws, nn.GroupNorm) > 0
    assert all(isinstance(m, WSConv2d) for m in gn_ws.modules() if isinstance(m, nn.Conv2d))
    none = build_encoder(EncoderSpec(width=16, norm="none"))
    assert count(none, nn.BatchNorm2d) == 0 and count(none, nn.GroupNorm) == 0


def test_weight_standardisation_normalises_each_filter():
    conv = WSConv2d(3, 4, 3, bias=False)
    with torch.no_grad():
        conv.weight.mul_(10).add_(5)
    x = torch.randn(1, 3, 5, 5)
    w = conv.weight
    w_std = (w - w.mean((1, 2, 3), keepdim=True)) / torch.sqrt(
        w.var((1, 2, 3), keepdim=True, unbiased=False) + 1e-5
    )
    assert torch.allclose(conv(x), nn.functional.conv2d(x, w_std), atol=1e-4)


@pytest.mark.parametrize(
    ("norm", "kind"),
    [
        ("batch", view_bn.BatchNorm1d),  # an nn.BatchNorm1d that can keep views apart
        ("layer", nn.LayerNorm),
        ("group", nn.GroupNorm),
        ("none", nn.Identity),
    ],
)
def test_mlp_is_linear_norm_relu_linear(norm, kind):
    mlp = MLP(32, 8, MLPSpec(hidden_dim=16, norm=norm, groups=4))
    assert [type(m) for m in mlp] == [nn.Linear, kind, nn.ReLU, nn.Linear]
    assert mlp(torch.randn(4, 32)).shape == (4, 8)


def test_target_starts_as_copy_without_gradients_and_no_norm_keeps_encoder_bn():
    model = BYOL(resolve_spec(variant="no_norm").model)
    for t, o in zip(*model.target_pairs(), strict=True):
        assert torch.equal(t, o) and not t.requires_grad and o.requires_grad
    assert count(model.online.projector, nn.BatchNorm1d) == 0
    assert count(model.online.predictor, nn.BatchNorm1d) == 0
    assert count(model.online.encoder, nn.BatchNorm2d) > 0
    # The predictor is online-only.
    assert not hasattr(model.target, "predictor")


def test_views_through_bn_separately_or_concatenated():
    torch.manual_seed(0)
    spec = resolve_spec()
    sep = BYOL(spec.model)
    cat = BYOL(spec.model.model_copy(update={"concat_views": True}))
    cat.load_state_dict(sep.state_dict())
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32) * 3 + 1]
    # Without batch statistics (eval mode) the two paths agree.
    sep.eval()
    cat.eval()
    assert torch.allclose(sep.online(views)[0][1], cat.online(views)[0][1], atol=1e-4)
    # With them, they differ: concatenated views share one batch's statistics.
    sep.train()
    cat.train()
    z_sep, _ = sep.online(views)
    z_cat, _ = cat.online(views)
    assert not torch.allclose(z_sep[0], z_cat[0], atol=1e-3)
