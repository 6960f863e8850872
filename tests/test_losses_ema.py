import torch
import torch.nn.functional as F

from byol_core.ema import ema_update
from byol_core.losses import BYOLLoss, InfoNCELoss, regression_loss


def test_regression_loss_is_two_minus_two_cos_and_normalised_mse():
    torch.manual_seed(0)
    p, z = torch.randn(16, 8), torch.randn(16, 8)
    cos = (p * z).sum(1) / (p.norm(dim=1) * z.norm(dim=1))
    assert torch.allclose(regression_loss(p, z), 2 - 2 * cos, atol=1e-6)
    mse = (F.normalize(p, dim=1) - F.normalize(z, dim=1)).square().sum(1)
    assert torch.allclose(regression_loss(p, z), mse, atol=1e-5)
    assert torch.allclose(regression_loss(p, 3 * p), torch.zeros(16), atol=1e-6)


def test_byol_loss_is_symmetric_and_stops_target_gradients():
    torch.manual_seed(0)
    p = [torch.randn(4, 8, requires_grad=True) for _ in range(2)]
    z = [torch.randn(4, 8, requires_grad=True) for _ in range(2)]
    loss = BYOLLoss()(p, z)
    expected = regression_loss(p[0], z[1]).mean() + regression_loss(p[1], z[0]).mean()
    assert torch.allclose(loss, expected)
    loss.backward()
    assert p[0].grad is not None and z[0].grad is None


def test_infonce_prefers_aligned_pairs_and_queue_wraps():
    torch.manual_seed(0)
    z = [F.normalize(torch.randn(8, 16), dim=1) for _ in range(2)]
    loss_fn = InfoNCELoss(16, temperature=0.2, queue_size=20)
    aligned = loss_fn([z[1], z[0]], z)
    shuffled = loss_fn([z[1].roll(1, 0), z[0].roll(1, 0)], z)
    assert aligned < shuffled
    assert int(loss_fn.queue_ptr) == (2 * 16) % 20
    # The newest key (last of view 2's targets) sits just before the pointer, after wrapping.
    assert torch.allclose(loss_fn.queue[11], z[1][7], atol=1e-6)


def test_ema_update_is_tau_weighted_average():
    target = [torch.ones(3), torch.zeros(2, 2)]
    online = [torch.full((3,), 3.0), torch.ones(2, 2)]
    ema_update(target, online, tau=0.75)
    assert torch.allclose(target[0], torch.full((3,), 0.75 * 1 + 0.25 * 3))
    assert torch.allclose(target[1], torch.full((2, 2), 0.25))
    ema_update(target, online, tau=1.0)
    assert torch.allclose(target[1], torch.full((2, 2), 0.25))
