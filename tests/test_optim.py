import math

import pytest
import torch
from torch import nn

from byol_core.diagnostics import trust_ratios
from byol_core.model import BYOL
from byol_core.optim import LARS, build_optimizer, param_groups, set_lr
from byol_core.presets import resolve_spec
from byol_core.spec import OptimSpec


def test_lars_step_matches_hand_computed_reference():
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
    opt = LARS([{"params": [w], "weight_decay": 0.1, "lars": True}], lr=0.5, momentum=0.9, eta=0.01)
    w.grad = torch.tensor([[1.0, 0.0]])
    opt.step()
    # g' = g + wd w = (1.3, 0.4); ||g'|| = sqrt(1.69 + 0.16); trust = eta ||w|| / ||g'||
    g1 = torch.tensor([[1.3, 0.4]])
    trust1 = 0.01 * 5.0 / math.sqrt(1.85)
    v1 = trust1 * g1
    w1 = torch.tensor([[3.0, 4.0]]) - 0.5 * v1
    assert torch.allclose(w.detach(), w1, atol=1e-6)
    # Second step: momentum v2 = 0.9 v1 + trust2 g2'.
    w.grad = torch.tensor([[0.0, 2.0]])
    opt.step()
    g2 = torch.tensor([[0.0, 2.0]]) + 0.1 * w1
    trust2 = 0.01 * w1.norm() / g2.norm()
    w2 = w1 - 0.5 * (0.9 * v1 + trust2 * g2)
    assert torch.allclose(w.detach(), w2, atol=1e-6)
    assert torch.allclose(opt.trust[0], trust2.reshape(1), atol=1e-6)


def test_lars_trust_ratio_is_one_for_zero_weights_or_grads():
    w = nn.Parameter(torch.zeros(2, 2))
    opt = LARS([w], lr=1.0, momentum=0.0, eta=0.001)
    w.grad = torch.ones(2, 2)
    opt.step()
    assert torch.allclose(w.detach(), -torch.ones(2, 2))


def test_sgd_mode_equals_torch_sgd():
    torch.manual_seed(0)
    ours, ref = nn.Linear(5, 3), nn.Linear(5, 3)
    ref.load_state_dict(ours.state_dict())
    opt = LARS([{"params": list(ours.parameters()), "lars": False, "weight_decay": 1e-2}], lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    for _ in range(3):
        x = torch.randn(8, 5)
        for net, o in ((ours, opt), (ref, ref_opt)):
            o.zero_grad()
            net(x).square().sum().backward()
            o.step()
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


class Odd(nn.Module):
    """Names chosen to fool a name-based exclusion rule."""

    def __init__(self) -> None:
        super().__init__()
        self.bn_bias = nn.Parameter(torch.randn(3, 3))  # a matrix: adapted, decayed
        self.weight = nn.Parameter(torch.randn(3))  # a vector: excluded
        self.norm = nn.LayerNorm(3)


def test_exclusion_is_by_type_and_rank_not_name():
    spec = OptimSpec(name="lars", weight_decay=0.5)
    odd = Odd()
    groups = param_groups(odd, spec)
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert by_param[id(odd.bn_bias)]["lars"] and by_param[id(odd.bn_bias)]["weight_decay"] == 0.5
    for p in (odd.weight, odd.norm.weight, odd.norm.bias):
        assert not by_param[id(p)]["lars"] and by_param[id(p)]["weight_decay"] == 0.0


def test_lars_can_be_limited_to_chosen_modules():
    spec = resolve_spec(
        overrides=["optim.name=lars", "optim.lars_modules=[encoder.layer1, encoder.layer2]"]
    )
    online = BYOL(spec.model).online
    names = {id(p): n for n, p in online.named_parameters()}
    adapted = [
        names[id(p)] for g in param_groups(online, spec.optim) if g["lars"] for p in g["params"]
    ]
    assert adapted and all(n.startswith(("encoder.layer1.", "encoder.layer2.")) for n in adapted)
    assert any(n.startswith("encoder.layer2.") for n in adapted)
    # Everything else is still optimised (SGD), nothing dropped.
    total = sum(len(g["params"]) for g in param_groups(online, spec.optim))
    assert total == len(list(online.parameters()))


def test_predictor_lr_multiplier_and_trust_diagnostics():
    spec = resolve_spec(overrides=["optim.name=lars", "optim.predictor_lr_mult=10"])
    online = BYOL(spec.model).online
    opt = build_optimizer(online, spec.optim, lr=0.1)
    set_lr(opt, 0.1)
    names = {id(p): n for n, p in online.named_parameters()}
    for g in opt.param_groups:
        pred = all(names[id(p)].startswith("predictor.") for p in g["params"])
        assert g["lr"] == pytest.approx(1.0 if pred else 0.1)
    _, p = online([torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)])
    (p[0].sum() + p[1].sum()).backward()
    opt.step()
    ratios = trust_ratios(opt, online)
    assert "encoder.conv1.weight" in ratios and ratios["encoder.conv1.weight"] > 0
    assert not any(n.endswith(".bias") for n in ratios)


def test_fused_and_foreach_updates_agree():
    """The fused kernel (CPU/CUDA) and the foreach fallback (other devices) are one update:
    LARS and plain groups, weight decay, momentum, three steps.

    Both get the same gradients at every step (drawn, not back-propagated): through a network
    the kernels' last-bit differences (the fused kernel's FMAs round once, the foreach ops
    twice) would grow from step to step by an amount that depends on the CPU's kernels, and
    the comparison would measure the network instead of the update."""

    def run(fused: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
        start.extend(p.detach().clone() for p in net.parameters())
        groups = [
            {"params": [net[0].weight, net[2].weight], "lars": True, "weight_decay": 1e-2},
            {"params": [net[0].bias, net[2].bias, *net[1].parameters()], "lars": False,
             "weight_decay": 0.0},
        ]  # fmt: skip
        opt = LARS(groups, lr=0.3, momentum=0.9, eta=0.01, fused=fused)
        grads = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in net.parameters():
                p.grad = torch.randn(p.shape, generator=grads)
            opt.step()
        return [p.detach().clone() for p in net.parameters()]

    start: list[torch.Tensor] = []
    fused = run(fused=True)
    assert all(not torch.equal(a, b) for a, b in zip(fused, start, strict=True))
    foreach = run(fused=False)
    for a, b in zip(fused, foreach, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("lars", [False, True])
def test_channels_last_weights_take_the_fused_update_in_place_without_copies(lars: bool):
    """A channels_last convolution weight (the training default on the CPU) gets the update of
    the same weight stored contiguously, stays the same tensor in the same layout, and reaches
    the fused kernel as a contiguous view, so the kernel copies nothing (``_dense_views``: its
    copies tripled the update's time). Plain SGD agrees bit for bit; LARS within rounding,
    since its norms sum in the layout's order."""

    def run(memory_format: torch.memory_format) -> tuple[torch.Tensor, torch.Tensor, int]:
        torch.manual_seed(0)
        conv = nn.Conv2d(8, 16, 3, bias=False).to(memory_format=memory_format)
        weight = conv.weight
        group = {"params": [weight], "lars": lars, "weight_decay": 1e-2}
        opt = LARS([group], lr=0.3, eta=0.01)
        grads = torch.Generator().manual_seed(1)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                grad = torch.randn(weight.shape, generator=grads)
                weight.grad = grad.to(memory_format=memory_format)
                opt.step()
        assert conv.weight is weight
        clones = sum(e.count for e in prof.key_averages() if e.key == "aten::clone")
        return weight.detach().clone(), opt.state[weight]["momentum_buffer"].clone(), clones

    weight, momentum, clones = run(torch.channels_last)
    weight_ref, momentum_ref, _ = run(torch.contiguous_format)
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert clones == 0
    if lars:
        torch.testing.assert_close(weight, weight_ref, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(momentum, momentum_ref, rtol=1e-6, atol=1e-7)
    else:
        assert torch.equal(weight, weight_ref) and torch.equal(momentum, momentum_ref)
