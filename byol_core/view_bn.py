"""Batch norm over a batch made of several views, with statistics per view.

BYOL's reference implementations run the two augmented views through the networks separately,
so every batch-norm layer normalises each view with that view's own statistics. Running the
views as one concatenated batch would share the statistics between them: a different method
(``model.concat_views``). The layers here keep the reference semantics in one pass: the model
forward says that its batch consists of ``G`` contiguous, equally sized chunks (one per view),
and each layer normalises every chunk with the chunk's own statistics, as ``G`` separate passes
would, running statistics included (``G`` momentum updates, chunk 1 first).

Why bother: with global batch statistics one collective per layer then carries the statistics
of every view (``sync_bn``), which halves the collectives of a step; and every other layer runs
once per step on the larger batch instead of once per view.

The number of chunks is an attribute of each layer (``view_groups``), set by the model forward
through ``view_groups(module, G)`` for that module's layers only and reset afterwards: nothing
is shared between models, and a layer called outside such a forward is an ordinary batch norm.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.autograd.function import once_differentiable

_BatchNorm = nn.modules.batchnorm._BatchNorm


class ViewGroupedNorm:
    """Mixin marking a batch norm that normalises ``view_groups`` chunks of its batch separately.

    A plain class attribute, not a buffer: it is not part of the state (checkpoints are the
    same as with torch's batch norm) and it is set per forward by ``view_groups``.
    """

    view_groups: int = 1


def check_groups(x: torch.Tensor, groups: int) -> None:
    if x.shape[0] % groups:
        raise ValueError(f"a batch of {x.shape[0]} does not split into {groups} equal views")


def chunkwise(
    forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, groups: int
) -> torch.Tensor:
    """A batch norm's own ``forward`` on every view chunk, in order, joined again: the calls
    separate passes would make. Costs a copy of the output (and of the gradient); used where
    that is cheap (GPUs) or where the layer's forward must run as it is (``SyncBatchNorm``).
    """
    check_groups(x, groups)
    if groups == 1:
        return forward(x)
    return torch.cat([forward(chunk) for chunk in x.chunk(groups)])


def momentum_factors(bn: _BatchNorm, groups: int) -> list[float]:
    """The running-statistics factor of each of ``groups`` consecutive training forwards,
    counting them in ``num_batches_tracked``: ``nn.BatchNorm.forward``'s rule, once per view."""
    factors = []
    for _ in range(groups):
        factor = 0.0 if bn.momentum is None else bn.momentum
        if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:  # cumulative moving average
                factor = 1.0 / float(bn.num_batches_tracked)
        factors.append(factor)
    return factors


class _ChunkwiseBatchNormFunction(torch.autograd.Function):
    """torch's own training-mode batch-norm kernels, one call per view chunk, writing into one
    output tensor: the numbers of separate passes without concatenating outputs (on CPU a
    ``cat`` per layer costs several per cent of a step)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, factors, eps):
        groups, channels = len(factors), x.shape[1]
        # torch keeps the statistics of bf16 input in the parameters' dtype (mixed precision).
        params = [t for t in (weight, running_mean) if t is not None]
        stat_dtype = params[0].dtype if params else x.dtype
        y = torch.empty_like(x)
        save_mean = x.new_empty((groups, channels), dtype=stat_dtype)
        save_invstd = torch.empty_like(save_mean)
        for g, (xg, yg) in enumerate(zip(x.chunk(groups), y.chunk(groups), strict=True)):
            torch.ops.aten.native_batch_norm.out(
                xg, weight, bias, running_mean, running_var, True, factors[g], eps,
                out=yg, save_mean=save_mean[g], save_invstd=save_invstd[g],
            )  # fmt: skip
        ctx.save_for_backward(x, weight, running_mean, running_var, save_mean, save_invstd)
        ctx.eps = eps
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, running_mean, running_var, save_mean, save_invstd = ctx.saved_tensors
        groups = save_mean.shape[0]
        affine = weight is not None
        mask = [ctx.needs_input_grad[0], affine and ctx.needs_input_grad[1]]
        mask.append(affine and ctx.needs_input_grad[2])
        # grad_out as it comes (no change of memory format): torch's kernels then take the path,
        # and give the bits, that they take in separate passes.
        grad_input = torch.empty_like(x) if mask[0] else None
        grad_weight = grad_bias = None
        gis = grad_input.chunk(groups) if grad_input is not None else [None] * groups
        for g, (xg, dyg) in enumerate(zip(x.chunk(groups), grad_out.chunk(groups), strict=True)):
            gi, gw, gb = torch.ops.aten.native_batch_norm_backward(
                dyg, xg, weight, running_mean, running_var, save_mean[g], save_invstd[g],
                True, ctx.eps, mask,
            )  # fmt: skip
            if gis[g] is not None:
                gis[g].copy_(gi)
            if mask[1]:
                grad_weight = gw if grad_weight is None else grad_weight + gw
            if mask[2]:
                grad_bias = gb if grad_bias is None else grad_bias + gb
        return grad_input, grad_weight, grad_bias, None, None, None, None


def memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def local_view_batch_norm(
    bn: _BatchNorm, x: torch.Tensor, torch_forward: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``bn`` in batch-statistics mode with per-process statistics per view chunk.

    ``torch_forward`` is the layer's ``nn.BatchNorm`` forward, used per chunk off the CPU (where
    the copy of ``chunkwise`` is cheap and torch may pick cuDNN).
    """
    groups = bn.view_groups  # type: ignore[attr-defined]
    check_groups(x, groups)
    if x.device.type != "cpu":
        return chunkwise(torch_forward, x, groups)
    bn._check_input_dim(x)
    factors = momentum_factors(bn, groups)
    # nn.BatchNorm's rule: running statistics are updated in training mode when tracked.
    use_running = not bn.training or bn.track_running_stats
    return _ChunkwiseBatchNormFunction.apply(
        x,
        bn.weight,
        bn.bias,
        bn.running_mean if use_running else None,
        bn.running_var if use_running else None,
        tuple(factors),
        bn.eps,
    )


class ViewBatchNorm(ViewGroupedNorm):
    """Mixin for ``nn.BatchNorm1d``/``2d``: per-view statistics inside a ``view_groups``
    forward. In eval mode (running statistics) normalisation is per example, so the whole batch
    is one call."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        if self.view_groups == 1 or not bn_training:
            return super().forward(input)  # type: ignore[misc]
        return local_view_batch_norm(self, input, super().forward)  # type: ignore[arg-type,misc]


class BatchNorm1d(ViewBatchNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` with per-view statistics inside a ``view_groups`` forward."""


class BatchNorm2d(ViewBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with per-view statistics inside a ``view_groups`` forward."""


@contextlib.contextmanager
def view_groups(module: nn.Module, groups: int) -> Iterator[None]:
    """Within the block, every batch norm in ``module`` treats its batch as ``groups`` views.

    Refuses a batch norm that cannot (torch's own ``BatchNorm``/``SyncBatchNorm``): it would
    silently share statistics across views, another method.
    """
    layers = []
    for name, m in module.named_modules():
        if isinstance(m, ViewGroupedNorm):
            layers.append(m)
        elif isinstance(m, _BatchNorm) and groups > 1:
            raise TypeError(
                f"batch norm {name!r} ({type(m).__name__}) cannot normalise views separately in "
                "one pass; build it with byol_core.view_bn or byol_core.sync_bn"
            )
    for m in layers:
        m.view_groups = groups
    try:
        yield
    finally:
        for m in layers:
            m.view_groups = 1
