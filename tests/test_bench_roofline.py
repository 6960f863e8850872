"""benchmarks.roofline: the arithmetic a step does, and what a target asks of the CPU's.

The counts are checked against products whose operations are known by hand; the report's
conclusions on made-up figures, as in test_bench_verdicts.
"""

from __future__ import annotations

import dataclasses
import statistics

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.roofline import count_flops, peak_kernels, share_needed
from benchmarks.step import StepResult, markdown, step_spec
from benchmarks.verdicts import summary
from byol_core.runtime import resolve_runtime
from byol_core.small_map_conv import SmallMapConv2d


def test_a_product_and_a_convolution_are_counted_by_hand() -> None:
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert count_flops(lambda: a @ b) == 2 * 8 * 16 * 4
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=False)
    x = torch.randn(2, 3, 6, 6)
    # 2 images x 5 filters x 36 outputs x 27 taps, a multiply and an add each.
    assert count_flops(lambda: conv(x)) == 2 * 2 * 5 * 36 * 27


def test_the_backward_of_small_map_products_is_counted_as_torchs_convolution() -> None:
    # SmallMapConv2d does its convolution as matrix products in a custom autograd function:
    # the count must see them, forward and backward, or our step would look cheaper than the
    # peers' for the same arithmetic.
    torch.manual_seed(0)
    plain = nn.Conv2d(64, 64, 3, padding=1, bias=False)
    ours = SmallMapConv2d(64, 64, 3, padding=1, bias=False)
    assert ours.max_positions > 0
    x = torch.randn(4, 64, 2, 2, requires_grad=True)

    def step(conv: nn.Module) -> None:
        conv(x).sum().backward()

    assert count_flops(lambda: step(ours)) == count_flops(lambda: step(plain)) > 0
    with FlopCounterMode(display=False) as counter:
        step(ours)
    assert set(map(str, counter.get_flop_counts()["Global"])) == {"aten.mm"}  # the products


def test_the_ceiling_kernels_state_their_own_arithmetic() -> None:
    # The ceiling is operations over time, so each kernel's stated count must be what it does.
    kernels = peak_kernels(torch.float32, size=64, conv_shape=(2, 16, 8, 8))
    assert set(kernels) == {"product", "conv3x3"}
    for fn, flops in kernels.values():
        assert count_flops(fn) == flops


def result() -> StepResult:
    # Ours 0.5 s and byol-pytorch 1.2 s for 150 GFLOP each; the peak rate is 400 GFLOP/s in
    # bf16 and 150 in fp32. 3x needs 150 GFLOP in 0.4 s: 375 GFLOP/s, 94 % of bf16's.
    samples = {
        "ours": [0.5, 0.5],
        "byol-pytorch": [1.2, 1.2],
        "lightly": [1.1, 1.1],
        "supervised": [0.36, 0.36],
    }
    # bf16 as on a CPU with bf16 instructions, whatever this one has: only the report is read.
    runtime = dataclasses.replace(resolve_runtime(step_spec().runtime), bf16=True)
    r = StepResult(2, runtime, samples=samples)
    r.seconds = {name: statistics.median(v) for name, v in samples.items()}
    r.flops = {"ours": 150e9, "byol-pytorch": 150e9, "lightly": 150e9, "supervised": 111e9}
    r.ceilings = {"bf16": 400e9, "fp32": 150e9}
    return r


def test_shares_of_the_ceiling() -> None:
    assert share_needed(150e9, 0.4, 400e9) == pytest.approx(0.9375)
    r = result()
    assert (r.precision("ours"), r.precision("supervised")) == ("bf16", "bf16")
    assert r.precision("byol-pytorch") == "fp32"
    assert r.ceiling_share("byol-pytorch") == pytest.approx(150 / 1.2 / 150)
    assert r.target_share("byol-pytorch", 3.0) == pytest.approx(150 / 0.4 / 400)
    r.runtime = dataclasses.replace(r.runtime, bf16=False)  # an fp32-only CPU
    assert r.target_share("byol-pytorch", 3.0) == pytest.approx(150 / 0.4 / 150)


def test_the_report_says_what_a_target_asks_of_the_cpu() -> None:
    r = result()
    text = markdown(r)
    row = "| byol-pytorch 0.9.1, its README's step (fp32, Adam) | 150.0 | 125 | 83% of fp32's |"
    assert row in text
    assert "3.0x over byol-pytorch needs our 150.0 GFLOP in 400 ms: **94%**" in text
    # The supervised pass: 111 GFLOP in 0.36 s, 77 % of bf16's rate.
    assert "above the 77% that the supervised forward + backward" in text
    # lightly: 2x needs 150 GFLOP in 550 ms, 68 % of the ceiling.
    assert "2.0x over lightly needs our 150.0 GFLOP in 550 ms: **68%**" in text
    assert "within the 77% that the supervised pass" in text
    assert "at 94% of this CPU's bf16 peak rate" in summary(r, None)
    # A target beyond the peak rate itself is called impossible, not merely far.
    r.ceilings["bf16"] = 300e9
    assert "more than the CPU's fastest kernels do" in markdown(r)


def test_a_run_without_counts_reports_no_arithmetic() -> None:
    r = result()
    r.flops = {}
    assert "Arithmetic" not in markdown(r)
    assert "peak rate" not in summary(r, None)
