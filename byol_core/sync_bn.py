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


def _channel_shape(x: torch.Tensor) -> list[int]:
    return [1, x.shape[1]] + [1] * (x.dim() - 2)


def _acc(x: torch.Tensor) -> torch.Tensor:
    # Batch statistics in at least float32: bf16/fp16 input is upcast, fp64 stays.
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
    def forward(ctx, x, weight, bias, mean, var, invstd, count, group, eps):
        # torch's fused eval-mode kernel normalises with the given (global) statistics in one
        # pass, for fp32 and for bf16 input with fp32 statistics alike.
        y = torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, False)
        ctx.save_for_backward(x, weight, mean, var, invstd, count)
        ctx.group, ctx.eps = group, eps
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mean, var, invstd, count = ctx.saved_tensors
        shape = _channel_shape(x)
        grad_out = grad_out.contiguous(memory_format=_memory_format(x))
        w = torch.ones_like(mean) if weight is None else weight
        # One fused reduction gives sum(dy) and sum(dy * x_hat) with the global mean/invstd.
        _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            grad_out, x, w, None, None, mean, invstd, True, ctx.eps, [False, True, True]
        )
        grad_input = grad_weight = grad_bias = None
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = sum_dy_xhat.to(weight.dtype)
        if weight is not None and ctx.needs_input_grad[2]:
            grad_bias = sum_dy.to(weight.dtype)
        if ctx.needs_input_grad[0]:
            sums = torch.cat([sum_dy, sum_dy_xhat]).to(mean.dtype)
            dist.all_reduce(sums, group=ctx.group)
            mean_dy, mean_dy_xhat = (sums / count).chunk(2)
            scale = invstd if weight is None else weight * invstd
            # w invstd (dy - mean_dy - x_hat mean_dy_xhat) = w invstd dy + k x + k0, per channel:
            # the first term by the fused eval-mode backward, the rest in one addcmul.
            grad_input, _, _ = torch.ops.aten.native_batch_norm_backward(
                grad_out, x, w, mean, var, None, None, False, ctx.eps, [True, False, False]
            )
            k = -scale * mean_dy_xhat * invstd
            k0 = -scale * mean_dy - k * mean
            grad_input = grad_input.addcmul_(x, k.view(shape).to(x.dtype)).add_(
                k0.view(shape).to(x.dtype)
            )
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


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
            # Local moments from torch's fused kernel (in fp32: bf16 statistics would be too
            # coarse), turned into sum and sum of squares in float64 so that
            # E[x^2] - E[x]^2 cancels only in float64.
            xf = _acc(input.detach())
            local_mean, local_var = torch.batch_norm_update_stats(xf, None, None, 0.0)
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
            dtype = xf.dtype
            mean, var, count = mean64.to(dtype), var64.to(dtype), count.to(dtype)
            invstd = torch.rsqrt(var + self.eps)
            if self.training and self.track_running_stats:
                self._update_running_stats(mean, var, count)

        return _GlobalBatchNormFunction.apply(
            input, self.weight, self.bias, mean, var, invstd, count, self.process_group, self.eps
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
