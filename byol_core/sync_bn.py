"""Batch norm with statistics over the whole distributed batch, on any device.

Why this exists: ``torch.nn.SyncBatchNorm`` refuses CPU tensors, and distributed training here
also runs on CPU (gloo). ``GlobalBatchNorm`` computes the batch statistics over the examples of
every process in its process group, on CPU or GPU; ``convert_sync_batchnorm`` picks torch's
``SyncBatchNorm`` for modules on CUDA and ``GlobalBatchNorm`` otherwise.

Why it matters for the study: in BYOL, batch norm is the implicit contrast. Normalising with
batch statistics makes each example's representation depend on the other examples of its batch,
so *which* examples share statistics (one process's slice, or the whole global batch) decides
which examples each example is compared with. The scope of batch statistics is therefore an
experimental variable, not an implementation detail: "local" (plain BatchNorm under DDP) and
"global" (this module) are different experiments.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _channel_shape(x: torch.Tensor) -> list[int]:
    return [1, x.shape[1]] + [1] * (x.dim() - 2)


def _acc(x: torch.Tensor) -> torch.Tensor:
    # Statistics and normalisation in at least float32: bf16/fp16 input is upcast, fp64 stays.
    return x.to(torch.promote_types(x.dtype, torch.float32))


class _GlobalBatchNormFunction(torch.autograd.Function):
    """Normalise with given global statistics; the backward accounts for their dependence on x.

    ``mean``/``invstd`` come in as constants (computed without grad); the backward adds their
    gradient path, which needs the global sums of grad_out and grad_out * x_hat.

    Gradient scale: each process's grad_out comes from its own loss L_r (a mean over its local
    examples), and DDP averages parameter gradients over the W processes, i.e. it differentiates
    L = mean_r L_r. For local example i, dL/dy_i = grad_out_i / W, so
        dL/dx_i = (w invstd / W) (g_i - sum_all(g) / n - x_hat_i sum_all(g x_hat) / n)
    with n the global count. Returning W * dL/dx_i (no 1/W) makes every upstream parameter
    gradient W times its local contribution to dL/dtheta, which DDP's average over W turns into
    the exact total. Likewise the weight/bias gradients are the local sums of g and g * x_hat,
    whose average over the processes is dL/dweight and dL/dbias. This is torch's SyncBatchNorm
    convention; with equal local batches it reproduces one process on the concatenated batch.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, count, group):
        shape = _channel_shape(x)
        x_hat = (_acc(x) - mean.view(shape)) * invstd.view(shape)
        y = x_hat
        if weight is not None:
            y = y * weight.view(shape) + bias.view(shape)
        ctx.save_for_backward(x, weight, mean, invstd, count)
        ctx.group = group
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mean, invstd, count = ctx.saved_tensors
        shape, dims = _channel_shape(x), _reduce_dims(x)
        g = _acc(grad_out)
        x_hat = (_acc(x) - mean.view(shape)) * invstd.view(shape)
        sum_dy = g.sum(dims)
        sum_dy_xhat = (g * x_hat).sum(dims)
        grad_input = grad_weight = grad_bias = None
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = sum_dy_xhat.to(weight.dtype)
        if weight is not None and ctx.needs_input_grad[2]:
            grad_bias = sum_dy.to(weight.dtype)
        if ctx.needs_input_grad[0]:
            sums = torch.cat([sum_dy, sum_dy_xhat])
            dist.all_reduce(sums, group=ctx.group)
            mean_dy, mean_dy_xhat = (sums / count).chunk(2)
            scale = invstd if weight is None else weight * invstd
            grad_input = scale.view(shape) * (
                g - mean_dy.view(shape) - x_hat * mean_dy_xhat.view(shape)
            )
            grad_input = grad_input.to(x.dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose statistics are computed over the examples of every process in
    ``process_group`` (the default group when None).

    Accepts (N, C) and (N, C, *spatial) input, so it stands in for BatchNorm1d and BatchNorm2d.
    In training mode (or without running statistics), with torch.distributed initialised and
    more than one process in the group, each process computes its per-channel mean and variance
    (torch's stable kernel, in float32 also under bf16 autocast) and turns them into the sum and
    sum of squares in float64; one all_reduce of [sum, sumsq, count] gives the global mean and
    biased variance. (E[x^2] - E[x]^2 from float32 sums is off by ~8% for |mean| / std = 1000;
    cancelling in float64 it is not.) Running statistics follow torch: the unbiased global
    variance, and ``momentum=None`` for a cumulative average. The backward all-reduces sum(dy)
    and sum(dy * x_hat) in one call; weight/bias gradients are local sums, which DDP averages
    (see ``_GlobalBatchNormFunction``). Outside that case it is exactly ``nn.BatchNorm``.

    Nothing here waits for the device beyond the collectives themselves (no ``.item()``). Every
    process must call forward and backward on the same layers in the same order, as with any
    collective.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: dist.ProcessGroup | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (N, C, ...), got {input.dim()}-D")

    def _world_size(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        if not bn_training or self._world_size() == 1:
            return super().forward(input)
        if input.shape[1] != self.num_features:
            raise ValueError(f"expected {self.num_features} channels, got {input.shape[1]}")

        channels = input.shape[1]
        with torch.no_grad():
            xf = _acc(input.detach())
            # Local moments by torch's stable one-pass kernel, turned into sum and sum of
            # squares in float64: E[x^2] - E[x]^2 then cancels only in float64.
            local_var, local_mean = torch.var_mean(xf, _reduce_dims(xf), correction=0)
            n = input.numel() // channels
            local_mean = local_mean.double()
            stats = torch.cat(
                [
                    local_mean * n,
                    (local_var.double() + local_mean * local_mean) * n,
                    local_mean.new_full((1,), n),
                ]
            )
            dist.all_reduce(stats, group=self.process_group)
            count = stats[-1:]
            mean64 = stats[:channels] / count
            var64 = (stats[channels:-1] / count - mean64 * mean64).clamp_min(0)
            mean, var, count = mean64.to(xf.dtype), var64.to(xf.dtype), count.to(xf.dtype)
            invstd = torch.rsqrt(var + self.eps)
            if self.training and self.track_running_stats:
                self._update_running_stats(mean, var, count)

        return _GlobalBatchNormFunction.apply(
            input, self.weight, self.bias, mean, invstd, count, self.process_group
        )

    def _update_running_stats(
        self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor
    ) -> None:
        factor: float | torch.Tensor = 0.0 if self.momentum is None else self.momentum
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, without a host sync
                factor = 1.0 / self.num_batches_tracked.to(mean.dtype)
        if self.running_mean is None or self.running_var is None:
            return
        unbiased = var * count / (count - 1).clamp_min(1)
        for running, batch in ((self.running_mean, mean), (self.running_var, unbiased)):
            running.copy_(running * (1 - factor) + batch.to(running.dtype) * factor)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every BatchNorm1d/2d in ``module`` (recursively) by a batch norm with global
    statistics: ``nn.SyncBatchNorm`` when its parameters live on CUDA, ``GlobalBatchNorm``
    otherwise. Returns the converted module (a new object when ``module`` itself is a batch
    norm), like ``nn.SyncBatchNorm.convert_sync_batchnorm``.

    As in torch, the new layer takes over the old one's parameter and buffer tensors (weight,
    bias, running_mean, running_var, num_batches_tracked), so an optimizer built before the
    conversion still updates them; eps, momentum, affine, track_running_stats and the training
    flag are kept.
    """
    out = module
    if isinstance(module, _BN_TYPES):
        probe = module.weight if module.affine else module.running_mean
        on_cuda = probe is not None and probe.is_cuda
        cls = nn.SyncBatchNorm if on_cuda else GlobalBatchNorm
        out = cls(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            process_group,
        )
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, process_group))
    return out
