"""GlobalBatchNorm against single-process training, with real processes (gloo, no mocks).

Two processes train on the halves of a fixed batch of 2B examples; one process trains an
unconverted copy on the whole batch. With global batch statistics the two runs are the same
computation (up to float summation order); with per-process ("local") statistics they are not.

The workers run once per module (one spawn of two processes) and save what they saw; the tests
compare with the single process. Both processes are on this host, so global BN's collectives go
through shared memory (``shm_all_reduce``) by default; the runs marked ``backend`` send them
through gloo instead, as between hosts, and must give the same results.

The BYOL steps run the two views as one batch whose batch norms keep per-view statistics (the
default, ``view_bn``); the single process they are compared with makes the reference's separate
pass per view. A second distributed run with separate passes checks that the one-pass path is the
same computation there too, with half the collectives.

The BYOL comparison is made twice. In float64 it is exact to ~1e-13: that is the proof that the
forward statistics and grad_input are right. In fp32 it holds to ~5e-6 after the first step, but
later steps can differ by ~1e-3: a ReLU input within fp32 rounding of zero (measured: 1e-6 in
encoder.bn1's output at step 2, with ~2.5e-5 rounding error in either run) takes the other side of
the kink in one of the runs, and its whole gradient goes to the other side. The single-process
fp32 run sits equally far from the float64 one; it happens not to flip that element.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from byol_core import sync_bn
from byol_core.ema import ema_update
from byol_core.losses import build_loss
from byol_core.model import BYOL
from byol_core.optim import build_optimizer
from byol_core.presets import resolve_spec
from byol_core.runtime import Runtime
from byol_core.sync_bn import GlobalBatchNorm, convert_sync_batchnorm
from byol_core.trainer import train_step

WORLD = 2
B = 4  # examples per process; the single process sees WORLD * B
STEPS = 3
TAU = 0.9  # lower than the presets' so that the target visibly moves in 3 steps
BYOL_OVERRIDES = [
    "model.encoder.width=8",
    "model.projector.hidden_dim=32",
    "model.predictor.hidden_dim=32",
    "model.projection_dim=16",
    "runtime.precision=fp32",
]
CPU = Runtime(device=torch.device("cpu"), bf16=False, channels_last=False)


# -- what both sides run ---------------------------------------------------------------------
def small_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 8),
        nn.BatchNorm1d(8),
        nn.Linear(8, 3),
    )


def small_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(WORLD * B, 3, 4, 4, generator=g), torch.randn(WORLD * B, 3, generator=g)


def byol_views(dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return [torch.rand(WORLD * B, 3, 16, 16, generator=g, dtype=dtype) for _ in range(2)]


def byol_model(dtype: torch.dtype, passes: str = "one"):
    spec = resolve_spec(overrides=BYOL_OVERRIDES)
    torch.manual_seed(spec.seed)
    model = BYOL(spec.model).to(dtype)
    model.online.view_passes = model.target.view_passes = passes
    return spec, model


def local_half(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t[rank * B : (rank + 1) * B]


def train_small(net: nn.Module, step_module: nn.Module, x, t) -> dict:
    """STEPS of SGD with momentum; loss = mean over the examples of a nonlinear function."""
    bn_out: list[list[torch.Tensor]] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: bn_out[-1].append(out.detach().clone()))
        for m in net.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    losses, grads = [], []
    for _ in range(STEPS):
        bn_out.append([])
        loss = (torch.tanh(step_module(x)) - t).pow(2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        grads.append({k: p.grad.clone() for k, p in net.named_parameters()})
        opt.step()
        losses.append(loss.detach())
    for h in hooks:
        h.remove()
    return {
        "loss": torch.stack(losses),
        "bn_out": bn_out,
        "grads": grads,
        "state": copy.deepcopy(net.state_dict()),
    }


def train_byol(model: BYOL, online: nn.Module, spec, views: list[torch.Tensor]) -> dict:
    loss_fn = build_loss(
        spec.loss.kind, spec.model.projection_dim, spec.loss.temperature, spec.loss.queue_size
    )
    optimizer = build_optimizer(model.online, spec.optim, spec.optim.lr)
    model.train()
    losses, online_states, target_states, collectives = [], [], [], []
    for _ in range(STEPS):
        with count_all_reduces() as calls:
            loss, _ = train_step(online, model.target, loss_fn, optimizer, views, CPU)
        collectives.append(len(calls))
        ema_update(*model.target_pairs(), TAU)
        losses.append(loss)
        online_states.append(copy.deepcopy(model.online.state_dict()))
        target_states.append(copy.deepcopy(model.target.state_dict()))
    return {
        "loss": torch.stack(losses),
        "online": online_states,
        "target": target_states,
        "all_reduces": collectives,
    }


@contextlib.contextmanager
def count_all_reduces() -> Iterator[list[None]]:
    """Batch norm's all-reduces (``sync_bn.all_reduce``, whichever way they travel)."""
    calls: list[None] = []
    original = sync_bn.all_reduce

    def counted(*args, **kwargs):
        calls.append(None)
        return original(*args, **kwargs)

    sync_bn.all_reduce = counted  # looked up at call time by the forward and the backward
    try:
        yield calls
    finally:
        sync_bn.all_reduce = original


def cumulative_running_stats(bn: nn.Module, x: torch.Tensor) -> dict:
    """momentum=None: running stats are the cumulative average over the batches seen."""
    for i in range(STEPS):
        bn(x * (i + 1) + i)
    return copy.deepcopy(bn.state_dict())


def offset_input() -> torch.Tensor:
    # |mean| / std up to 2000: with E[x^2] - E[x]^2 from float32 sums the outputs are off by 0.3.
    return small_data()[0] * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1) + 1000.0


def conv_bn_bf16(bn: nn.Module, x: torch.Tensor) -> dict:
    torch.manual_seed(4)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = bn(conv(x))
    return {"y": y.detach(), "state": copy.deepcopy(bn.state_dict())}


# -- the distributed side --------------------------------------------------------------------
def worker(rank: int, init_method: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD)
    try:
        x, t = small_data()
        x, t = local_half(x, rank), local_half(t, rank)
        results = {}

        for key, shared_memory in (("global", True), ("global_backend", False)):
            net = convert_sync_batchnorm(small_net(), shared_memory=shared_memory)
            assert sum(isinstance(m, GlobalBatchNorm) for m in net.modules()) == 2
            results[key] = train_small(net, DDP(net), x, t)
        # Over shared memory every process adds the same numbers in the same order.
        results["shm_used"] = sync_bn.shm_communicator() is not None

        net = small_net()  # "local" scope: every process normalises with its own B examples
        results["local"] = train_small(net, DDP(net), x, t)

        bn = GlobalBatchNorm(3, momentum=None)
        results["cumulative"] = cumulative_running_stats(bn, local_half(small_data()[1], rank))
        results["offset"] = GlobalBatchNorm(3)(local_half(offset_input(), rank)).detach()
        results["bf16"] = conv_bn_bf16(GlobalBatchNorm(4), x)

        for dtype, passes, shared_memory in (
            (torch.float64, "one", True),
            (torch.float32, "one", True),
            (torch.float64, "separate", True),
            (torch.float64, "one", False),
            (torch.float64, "auto", True),
            (torch.float64, "auto", False),
        ):
            spec, model = byol_model(dtype, passes)
            model.online = convert_sync_batchnorm(model.online, shared_memory=shared_memory)
            model.target = convert_sync_batchnorm(model.target, shared_memory=shared_memory)
            assert not any(isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) for m in model.modules())
            views = [local_half(v, rank) for v in byol_views(dtype)]
            key = f"byol_{dtype}_{passes}" + ("" if shared_memory else "_backend")
            results[key] = train_byol(model, DDP(model.online), spec, views)

        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("sync_bn")
    init = f"file://{out / 'rendezvous'}"
    mp.start_processes(worker, args=(init, str(out)), nprocs=WORLD, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


# -- comparisons -----------------------------------------------------------------------------
def max_dev(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def mean_of_ranks(ranks: list[dict], *keys: str) -> torch.Tensor:
    values = []
    for r in ranks:
        for k in keys:
            r = r[k]
        values.append(r)
    return torch.stack(values).mean(0)


@pytest.fixture(scope="module")
def single_small() -> dict:
    x, t = small_data()
    net = small_net()
    return train_small(net, net, x, t)


def test_shared_memory_transport_is_used_on_one_host(ranks):
    assert all(r["shm_used"] for r in ranks)


@pytest.mark.parametrize("transport", ["global", "global_backend"])
def test_global_bn_equals_single_process_on_the_whole_batch(ranks, single_small, transport):
    ref, got = single_small, [r[transport] for r in ranks]
    atol = 1e-5
    # BN outputs: the two halves, put back together, are the full batch's outputs.
    for step in range(STEPS):
        for layer, expected in enumerate(ref["bn_out"][step]):
            joined = torch.cat([g["bn_out"][step][layer] for g in got])
            assert torch.allclose(joined, expected, atol=atol), (step, layer)
    loss = mean_of_ranks(ranks, transport, "loss")
    assert torch.allclose(loss, ref["loss"], atol=atol), (loss, ref["loss"])
    for step in range(STEPS):
        for g in got:  # DDP-averaged gradients, the same on both ranks
            dev = max_dev(g["grads"][step], ref["grads"][step])
            assert dev < atol, (step, dev)
    for g in got:
        # weights, biases, running_mean, running_var, num_batches_tracked
        dev = max_dev(g["state"], ref["state"])
        assert dev < atol, dev
    print(f"\nsmall net, global BN: max |weights/buffers - single| = {dev:.2e}")


def test_local_bn_differs_from_single_process(ranks, single_small):
    # The same comparison with plain BatchNorm under DDP must fail: the test can tell.
    ref = single_small["state"]
    for r in ranks:
        state = r["local"]["state"]
        weights = [k for k in ref if k.endswith("weight")]
        assert not all(torch.allclose(state[k], ref[k], atol=1e-5) for k in weights)
        print(f"\nsmall net, local BN: max |state - single| = {max_dev(state, ref):.2e}")


def test_cumulative_running_stats_with_momentum_none(ranks):
    ref = cumulative_running_stats(nn.BatchNorm1d(3, momentum=None), small_data()[1])
    for r in ranks:
        assert max_dev(r["cumulative"], ref) < 1e-5


def test_global_bn_is_accurate_for_offset_input(ranks):
    x = offset_input()
    expected = nn.BatchNorm2d(3).double()(x.double()).float()
    joined = torch.cat([r["offset"] for r in ranks])
    assert (joined - expected).abs().max() < 1e-3


def test_bf16_autocast_statistics_in_float32(ranks):
    ref = conv_bn_bf16(nn.BatchNorm2d(4), small_data()[0])
    joined = torch.cat([r["bf16"]["y"] for r in ranks])
    assert joined.dtype == ref["y"].dtype == torch.bfloat16
    # Both normalise the same bf16 conv outputs with float32 statistics; outputs round to bf16.
    assert torch.allclose(joined.float(), ref["y"].float(), atol=2e-2)
    for r in ranks:
        assert r["bf16"]["state"]["running_var"].dtype == torch.float32
        assert max_dev(r["bf16"]["state"], ref["state"]) < 1e-5


def check_byol(
    ranks: list[dict],
    dtype: torch.dtype,
    *,
    first_step: float,
    weights: float,
    loss: float,
    run: str = "one",
):
    # The reference: one process, a separate pass per view on the whole batch, as the reference
    # implementations compute it.
    spec, model = byol_model(dtype, "separate")
    ref = train_byol(model, model.online, spec, byol_views(dtype))
    got = [r[f"byol_{dtype}_{run}"] for r in ranks]
    mean_loss = torch.stack([g["loss"] for g in got]).mean(0)  # DDP's objective
    devs = {"loss": (mean_loss - ref["loss"]).abs().max().item()}
    for part in ("online", "target"):
        devs[f"{part} step 1"] = max(max_dev(g[part][0], ref[part][0]) for g in got)
        devs[part] = max(max_dev(g[part][-1], ref[part][-1]) for g in got)
    print(f"\nBYOL {dtype}, global BN vs single process, max |diff|: {devs}")
    assert devs["online step 1"] < first_step and devs["target step 1"] < first_step, devs
    assert devs["online"] < weights and devs["target"] < weights, devs
    assert devs["loss"] < loss, devs
    for step in range(STEPS):  # the EMA targets stay identical across processes
        for k, v in got[0]["target"][step].items():
            assert torch.equal(v, got[1]["target"][step][k]), (step, k)


@pytest.mark.parametrize("run", ["one", "separate", "one_backend"])
def test_byol_with_global_bn_is_single_process_training_float64(ranks, run):
    # The loss value itself is computed in float32 (losses.regression_loss).
    check_byol(ranks, torch.float64, first_step=1e-10, weights=1e-10, loss=1e-6, run=run)


def test_byol_with_global_bn_is_single_process_training_fp32(ranks):
    # 1e-4 holds after one step; the 3-step bound is looser for ReLU-kink flips (module docstring).
    check_byol(ranks, torch.float32, first_step=1e-4, weights=1e-2, loss=1e-3)


def test_one_pass_with_view_groups_is_separate_passes_under_global_bn(ranks):
    # Both distributed, float64: the grouped pass against a separate pass per view, online and
    # target (weights and running statistics), and the loss, at every step.
    for r in ranks:
        grouped, sep = r["byol_torch.float64_one"], r["byol_torch.float64_separate"]
        assert (grouped["loss"] - sep["loss"]).abs().max() < 1e-6
        for part in ("online", "target"):
            for step in range(STEPS):
                assert max_dev(grouped[part][step], sep[part][step]) < 1e-10, (part, step)


def all_reduces_per_pass() -> int:
    _, model = byol_model(torch.float64)
    bns = [
        sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in part.modules())
        for part in (model.online, model.target)
    ]
    # Online: one all-reduce per layer in the forward and one in the backward; target: forward.
    return 2 * bns[0] + bns[1]


def test_one_pass_halves_the_batch_norm_collectives(ranks):
    per_pass = all_reduces_per_pass()
    for r in ranks:
        assert r["byol_torch.float64_one"]["all_reduces"] == [per_pass] * STEPS
        assert r["byol_torch.float64_separate"]["all_reduces"] == [2 * per_pass] * STEPS
    print(f"\nBN all-reduces per BYOL step: {per_pass} in one pass, {2 * per_pass} separately")


def test_auto_is_one_pass_under_global_bn_whichever_way_collectives_travel(ranks):
    per_pass = all_reduces_per_pass()
    for r in ranks:
        assert r["byol_torch.float64_auto"]["all_reduces"] == [per_pass] * STEPS
        assert r["byol_torch.float64_auto_backend"]["all_reduces"] == [per_pass] * STEPS


# -- without a process group: exactly nn.BatchNorm ----------------------------------------------
@pytest.mark.parametrize("shape", [(6, 5), (6, 5, 3, 3)])
def test_single_process_is_plain_batchnorm(shape):
    assert not dist.is_initialized()
    torch.manual_seed(3)
    x = torch.randn(shape, requires_grad=True)
    plain = (nn.BatchNorm1d if len(shape) == 2 else nn.BatchNorm2d)(5)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5)
        plain.bias.uniform_(-0.5, 0.5)
    ours = convert_sync_batchnorm(copy.deepcopy(plain))
    assert isinstance(ours, GlobalBatchNorm)
    for train in (True, False):
        plain.train(train)
        ours.train(train)
        a, b = plain(x), ours(x)
        assert torch.equal(a, b)
        ga = torch.autograd.grad(a.square().sum(), x)[0]
        gb = torch.autograd.grad(b.square().sum(), x)[0]
        assert torch.equal(ga, gb)
    assert max_dev(plain.state_dict(), ours.state_dict()) == 0


def test_convert_keeps_state_and_nesting():
    net = nn.Sequential(nn.Linear(4, 6), nn.Sequential(nn.BatchNorm1d(6, eps=1e-3, momentum=0.3)))
    inner = net[1][0]
    inner.eval()
    with torch.no_grad():
        inner.running_mean.fill_(0.5)
        inner.weight.fill_(2.0)
    inner.num_batches_tracked.fill_(7)
    converted = convert_sync_batchnorm(net)
    bn = converted[1][0]
    assert converted is net and isinstance(bn, GlobalBatchNorm)
    assert not bn.training and bn.eps == 1e-3 and bn.momentum == 0.3
    assert bn.affine and bn.track_running_stats
    assert bn.weight is inner.weight  # shared, as torch does: optimizers keep working
    assert bn.running_mean is inner.running_mean and int(bn.num_batches_tracked) == 7
    bare = convert_sync_batchnorm(nn.BatchNorm2d(3, affine=False, track_running_stats=False))
    assert isinstance(bare, GlobalBatchNorm) and bare.weight is None and bare.running_mean is None
