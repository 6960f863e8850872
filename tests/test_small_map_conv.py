"""SmallMapConv2d computes what nn.Conv2d computes, on the maps where it takes its own route."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from byol_core.networks import WSConv2d, build_encoder
from byol_core.small_map_conv import SmallMapConv2d, _SmallMapConv, cast_once, small_map_convs
from byol_core.spec import EncoderSpec


def _pair(cin: int, cout: int, stride: int, bias: bool) -> tuple[nn.Conv2d, SmallMapConv2d]:
    torch.manual_seed(0)
    ref = nn.Conv2d(cin, cout, 3, stride, 1, bias=bias)
    ours = SmallMapConv2d(cin, cout, 3, stride, 1, bias=bias)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _run(conv: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = x.clone().requires_grad_(True)
    conv.zero_grad(set_to_none=True)
    y = conv(x)
    # A fixed, non-uniform output gradient, so that every weight gets a distinct gradient.
    y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
    grads = [x.grad] + [p.grad for p in conv.parameters()]
    return y, grads


@pytest.mark.parametrize(
    ("size", "stride", "bias", "channels_last"),
    [
        (2, 1, False, True),  # 2x2 out: forward and both gradients as products
        (4, 2, True, False),  # 2x2 out from 4x4, strided, with a bias
        (3, 1, True, True),  # 3x3 out: forward and weight gradient as products
        (6, 2, False, False),  # 3x3 out from 6x6
        (4, 1, False, True),  # 4x4 out: in fp32 torch's convolution throughout (bf16 below)
        (5, 1, False, True),  # 5x5 out: torch's convolution throughout
    ],
)
def test_matches_conv2d_in_fp32(size: int, stride: int, bias: bool, channels_last: bool) -> None:
    ref, ours = _pair(8, 16, stride, bias)
    x = torch.randn(4, 8, size, size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        ref.to(memory_format=torch.channels_last)
        ours.to(memory_format=torch.channels_last)
    assert ours._small_map(x) == (size != 5)
    y_ref, g_ref = _run(ref, x)
    y, g = _run(ours, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    assert len(g) == len(g_ref) == (3 if bias else 2)
    for got, want in zip(g, g_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gradients_are_exact_in_float64() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    for stride in ((1, 1), (2, 2)):
        torch.autograd.gradcheck(
            lambda x, w, b, s=stride: _SmallMapConv.apply(x, w, b, s, (1, 1), (1, 1)), (x, w, b)
        )
    # 2x2 outputs, where the input gradient is a product too: dilated, and unevenly strided
    x2 = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(
        lambda x, w, b: _SmallMapConv.apply(x, w, b, (1, 1), (2, 2), (2, 2)), (x2, w, b)
    )
    x3 = torch.randn(2, 3, 4, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(
        lambda x, w, b: _SmallMapConv.apply(x, w, b, (2, 1), (0, 1), (1, 1)), (x3, w, b)
    )


def _exact_bf16_run(conv: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """What a bf16 autocast run computes before its own roundings: float64 on the input, the
    weights and the output gradient as autocast rounds them to bf16."""
    exact = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                      conv.padding, bias=conv.bias is not None).double()  # fmt: skip
    with torch.no_grad():
        for mine, theirs in zip(exact.parameters(), conv.parameters(), strict=True):
            mine.copy_(theirs.bfloat16())
    x = x.bfloat16().double().requires_grad_(True)
    y = exact(x)
    y.backward(torch.linspace(-1, 1, y.numel()).view_as(y).bfloat16().double())
    return y, [x.grad] + [p.grad for p in exact.parameters()]


# 2x2: every part a product; 3x3: the forward and the weight gradient; 4x4: the weight gradient
@pytest.mark.parametrize("size", [2, 3, 4])
def test_bf16_autocast_is_exact_within_bf16_rounding(size: int) -> None:
    """Against the exact result, not against nn.Conv2d's own bf16 run: on a CPU without native
    bf16 (an AVX2-only EPYC) torch's convolution is the less accurate of the two, its weight
    gradient at 1.1 times the bound below where ours stays under half of it, so the two
    disagree beyond any tolerance that still tests something."""
    ref, ours = _pair(64, 64, 1, False)
    x = torch.randn(8, 64, size, size).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref, g_ref = _run(ref, x)
        y, g = _run(ours, x)
    y_exact, g_exact = _exact_bf16_run(ref, x)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert [t.dtype for t in g] == [t.dtype for t in g_ref]
    for got, want in zip([y, *g], [y_exact, *g_exact], strict=True):
        # bf16 keeps 8 significant bits: one rounding of the result is within 2^-9 of the
        # largest value; 2^-7 leaves room for the fp32 sums and a rounded intermediate
        scale = want.abs().max().item()
        torch.testing.assert_close(got.double(), want.detach(), rtol=0, atol=scale * 2**-7)


def test_the_encoder_uses_it_and_keeps_torchvisions_state_dict() -> None:
    enc = build_encoder(EncoderSpec(arch="resnet18", width=64))
    convs = [m for m in enc.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(isinstance(m, SmallMapConv2d) for m in convs)
    ws = build_encoder(EncoderSpec(arch="resnet18", width=16, norm="group_ws"))
    assert all(isinstance(m, WSConv2d) for m in ws.modules() if isinstance(m, nn.Conv2d))
    from torchvision.models import resnet18

    assert set(enc.state_dict()) == set(resnet18().state_dict()) - {"fc.weight", "fc.bias"}


def test_conversion_keeps_the_weights_and_draws_no_random_numbers() -> None:
    """A seed must give the same encoder as before the conversion existed (earlier runs and
    tables stay reproducible), so converting may not consume the RNG."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Sequential(nn.Conv2d(8, 8, 1)))
    before = [p.clone() for p in net.parameters()]
    state = torch.random.get_rng_state()
    small_map_convs(net)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert isinstance(net[0], SmallMapConv2d) and isinstance(net[2][0], SmallMapConv2d)
    for got, want in zip(net.parameters(), before, strict=True):
        assert torch.equal(got, want)


def test_cast_once_shares_a_weight_cast_within_and_sees_changes_after() -> None:
    torch.manual_seed(0)
    conv = SmallMapConv2d(16, 16, 3, 1, 1, bias=False).to(memory_format=torch.channels_last)
    x = torch.randn(4, 16, 2, 2).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16), cast_once():
        with torch.no_grad():
            conv(x)  # a cast without grad, which the uses below must not take
        y1, y2 = conv(x), conv(x)
    (y1.float().sum() + y2.float().sum()).backward()
    assert torch.equal(y1, y2)
    once = conv.weight.grad.clone()
    conv.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    (2 * y.float().sum()).backward()
    torch.testing.assert_close(once, conv.weight.grad, rtol=2e-2, atol=2e-2)
    # a new region casts the weight as it is now
    with torch.no_grad():
        conv.weight.mul_(2)
    with torch.autocast("cpu", dtype=torch.bfloat16), cast_once():
        doubled = conv(x)
    torch.testing.assert_close(doubled.float(), 2 * y1.float(), rtol=2e-2, atol=2e-2)


def test_a_shared_cast_gives_the_gradient_the_weights_layout_even_for_1x1_kernels() -> None:
    # DDP's buckets take the parameter's strides; a 1x1 kernel's are ambiguous, and a gradient
    # summed over two uses came back contiguous instead (DDP warned and copied)
    conv = SmallMapConv2d(16, 32, 1, 2, 0, bias=False).to(memory_format=torch.channels_last)
    x = torch.randn(4, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16), cast_once():
        y = conv(x).float().sum() + conv(x.flip(0)).float().sum()
    y.backward()
    assert conv.weight.grad.stride() == conv.weight.stride() == (16, 1, 16, 16)
