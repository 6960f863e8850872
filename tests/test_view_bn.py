"""One pass with per-view batch norm (``view_bn``) against a separate pass per view, in one
process: outputs, loss, gradients and running statistics."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from byol_core.ema import ema_update
from byol_core.losses import build_loss
from byol_core.model import BYOL
from byol_core.optim import build_optimizer
from byol_core.presets import resolve_spec
from byol_core.runtime import Runtime
from byol_core.sync_bn import GlobalBatchNorm
from byol_core.trainer import train_step
from byol_core.view_bn import BatchNorm1d, BatchNorm2d, view_groups

SMALL = [
    "model.encoder.width=8",
    "model.encoder.groups=4",
    "model.projector.hidden_dim=32",
    "model.predictor.hidden_dim=32",
    "model.projection_dim=16",
]


def views(dtype: torch.dtype = torch.float64, n: int = 6) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    # Different distributions per view, so that shared statistics would show.
    return [torch.rand(n, 3, 16, 16, generator=g, dtype=dtype) * (1 + 2 * i) + i for i in range(2)]


def pair(variant: str = "byol", dtype: torch.dtype = torch.float64) -> tuple[BYOL, BYOL]:
    """The same model twice: one grouped pass for both views, and a pass per view."""
    spec = resolve_spec(variant=variant, overrides=SMALL)
    torch.manual_seed(spec.seed)
    grouped = BYOL(spec.model).to(dtype)
    separate = copy.deepcopy(grouped)
    grouped.online.view_passes = grouped.target.view_passes = "one"
    separate.online.view_passes = separate.target.view_passes = "separate"
    return grouped, separate


def max_dev(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def train(model: BYOL, xs: list[torch.Tensor], runtime: Runtime, steps: int = 3) -> dict:
    spec = resolve_spec(overrides=SMALL)
    loss_fn = build_loss(spec.loss.kind, spec.model.projection_dim, spec.loss.temperature, 0)
    optimizer = build_optimizer(model.online, spec.optim, 0.1)
    model.train()
    losses, grads = [], []
    for _ in range(steps):
        loss, _ = train_step(model.online, model.target, loss_fn, optimizer, xs, runtime)
        grads.append({k: p.grad.clone() for k, p in model.online.named_parameters()})
        ema_update(*model.target_pairs(), 0.9)
        losses.append(loss)
    return {"loss": torch.stack(losses), "grads": grads, "state": model.state_dict()}


FP64 = Runtime(device=torch.device("cpu"), bf16=False, channels_last=False)
FP32_CL = Runtime(device=torch.device("cpu"), bf16=False, channels_last=True)


def test_outputs_of_one_grouped_pass_are_those_of_separate_passes():
    grouped, separate = pair()
    xs = views()
    z_g, p_g = grouped.online(xs)
    z_s, p_s = separate.online(xs)
    t_g, t_s = grouped.target(xs), separate.target(xs)
    for a, b in zip([*z_g, *p_g, *t_g], [*z_s, *p_s, *t_s], strict=True):
        assert (a - b).abs().max() < 1e-12
    # Running statistics: two momentum updates per layer, view 1 then view 2.
    assert max_dev(grouped.state_dict(), separate.state_dict()) < 1e-13
    bn = grouped.online.encoder.bn1
    assert int(bn.num_batches_tracked) == 2
    # ... and not one update with statistics over both views.
    shared, _ = pair()
    shared.online.concat_views = True
    shared.online(xs)
    assert (shared.online.encoder.bn1.running_mean - bn.running_mean).abs().max() > 1e-3


@pytest.mark.parametrize("variant", ["byol", "layer_norm", "gn_ws_mlp_bn", "no_norm"])
def test_training_steps_grouped_equal_separate_float64(variant):
    grouped, separate = pair(variant)
    a, b = train(grouped, views(), FP64), train(separate, views(), FP64)
    assert (a["loss"] - b["loss"]).abs().max() < 1e-6  # the loss itself is fp32
    for ga, gb in zip(a["grads"], b["grads"], strict=True):
        assert max_dev(ga, gb) < 1e-10
    assert max_dev(a["state"], b["state"]) < 1e-10


def test_training_steps_grouped_equal_separate_fp32_channels_last():
    grouped, separate = pair(dtype=torch.float32)
    for m in (grouped, separate):
        m.to(memory_format=torch.channels_last)
    xs = views(torch.float32)
    a, b = train(grouped, xs, FP32_CL, steps=1), train(separate, xs, FP32_CL, steps=1)
    assert (a["loss"] - b["loss"]).abs().max() < 1e-5
    assert max_dev(a["state"], b["state"]) < 1e-4


@pytest.mark.parametrize("make", [BatchNorm2d, GlobalBatchNorm])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_layer_grouped_is_bitwise_torch_per_view(make, momentum):
    # Without a process group GlobalBatchNorm is a local batch norm too.
    torch.manual_seed(0)
    bn = make(4, momentum=momentum)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    ref = nn.BatchNorm2d(4, momentum=momentum)
    ref.load_state_dict(bn.state_dict())
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = (torch.randn(6, 4, 5, 5) * 3 + 1).contiguous(memory_format=fmt).requires_grad_()
        dy = torch.randn(6, 4, 5, 5)
        with view_groups(bn, 2):
            y = bn(x)
        (y * dy).sum().backward()
        y_ref = torch.cat([ref(c) for c in x.chunk(2)])
        gx = x.grad.clone()
        x.grad = None
        (y_ref * dy).sum().backward()
        assert torch.equal(y, y_ref) and torch.equal(gx, x.grad)
        assert y.is_contiguous(memory_format=fmt) and gx.is_contiguous(memory_format=fmt)
        for p, q in zip(bn.parameters(), ref.parameters(), strict=True):
            assert torch.equal(p.grad, q.grad)
        for k, v in ref.state_dict().items():
            assert torch.equal(bn.state_dict()[k], v), k


def test_bf16_input_keeps_float32_statistics():
    bn, ref = BatchNorm1d(8), nn.BatchNorm1d(8)
    x = (torch.randn(12, 8) * 2 + 3).to(torch.bfloat16)
    with view_groups(bn, 2):
        y = bn(x)
    y_ref = torch.cat([ref(c) for c in x.chunk(2)])
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_ref)
    assert bn.running_var.dtype == torch.float32
    assert torch.equal(bn.running_var, ref.running_var)


def test_eval_mode_normalises_the_whole_batch_at_once():
    bn = BatchNorm2d(3)
    bn.running_mean.fill_(0.5)
    bn.eval()
    x = torch.randn(4, 3, 2, 2)
    with view_groups(bn, 2):
        y = bn(x)
    assert torch.equal(y, nn.functional.batch_norm(x, bn.running_mean, bn.running_var))
    assert int(bn.num_batches_tracked) == 0


def test_groups_are_set_per_model_and_reset():
    grouped, _ = pair()
    other, _ = pair()
    seen = []
    hook = grouped.online.encoder.bn1.register_forward_pre_hook(
        lambda m, _: seen.append(m.view_groups)
    )
    grouped.online(views())
    hook.remove()
    assert seen == [2]
    for m in [*grouped.modules(), *other.modules()]:
        assert getattr(m, "view_groups", 1) == 1
    # A batch norm that cannot keep views apart is refused, not silently shared.
    grouped.online.projector[1] = nn.BatchNorm1d(32).double()
    with pytest.raises(TypeError, match=r"projector\.1"):
        grouped.online(views())
    bn = BatchNorm1d(2)
    with pytest.raises(ValueError, match="does not split"), view_groups(bn, 2):
        bn(torch.randn(3, 2))


def test_auto_is_a_pass_per_view_unless_batch_norm_is_synchronised():
    # One process: nothing is synchronised, and a pass per view measured faster on CPU.
    model, _ = pair()
    calls = []
    model.online.encoder.bn1.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    model.online.view_passes = "auto"
    model.online(views())
    assert calls == [6, 6]
    calls.clear()
    model.online.view_passes = "one"
    model.online(views())
    assert calls == [12]
