import math

import pytest

from byol_core.schedules import learning_rate, scaled_lr, target_decay


def test_learning_rate_warmup_then_cosine_to_zero():
    base, warm, total = 0.4, 10, 110
    assert learning_rate(0, total, base, warm) == pytest.approx(base / warm)
    assert learning_rate(warm - 1, total, base, warm) == pytest.approx(base)
    assert learning_rate(warm, total, base, warm) == pytest.approx(base)
    assert learning_rate(warm + 50, total, base, warm) == pytest.approx(base / 2)
    assert learning_rate(total, total, base, warm) == pytest.approx(0.0, abs=1e-12)
    assert learning_rate(total - 1, total, base, warm) < 1e-3 * base


def test_constant_learning_rate_and_batch_scaling():
    assert learning_rate(500, 1000, 0.3, 0, "constant") == 0.3
    assert scaled_lr(0.2, 4096) == pytest.approx(3.2)
    assert scaled_lr(0.2, 4096, scale=False) == 0.2


def test_tau_schedule_ends():
    assert target_decay(0, 1000, 0.996) == pytest.approx(0.996)
    assert target_decay(1000, 1000, 0.996) == pytest.approx(1.0)
    assert target_decay(500, 1000, 0.99) == pytest.approx(
        1 - 0.01 * (math.cos(math.pi / 2) + 1) / 2
    )
    assert target_decay(700, 1000, 0.99, "constant") == 0.99
