"""Batch norm with statistics over the whole distributed batch, on any device.

Why this exists: ``torch.nn.SyncBatchNorm`` refuses CPU tensors, and distributed training here
also runs on CPU (gloo). ``GlobalBatchNorm`` computes the batch statistics over the examples of
every process in its process group, on CPU or GPU; ``convert_sync_batchnorm`` picks torch's
``SyncBatchNorm`` for modules on CUDA and ``GlobalBatchNorm`` otherwise. Both keep the views of a
``view_bn.view_groups`` forward apart; ``GlobalBatchNorm`` does so with one collective per layer
for all views (forward and backward), which is most of what global batch norm costs on CPU.

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
from torch.autograd.function import once_differentiable

from byol_core.shm_all_reduce import shm_communicator, yield_cpu
from byol_core.view_bn import (
    ViewGroupedNorm,
    check_groups,
    chunkwise,
    local_view_batch_norm,
    memory_format,
)

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)


def all_reduce(
    tensor: torch.Tensor, group: dist.ProcessGroup | None, shared_memory: bool = True
) -> None:
    """Sum ``tensor`` over ``group`` in place: through shared memory when every process of the
    group is on this host and the tensor is on the CPU (``shm_all_reduce``), else through the
    group's backend.

    ``shared_memory=False`` always takes the backend, waited for by polling instead of blocking.
    Why polling: batch norm's collectives are small and on the critical path, and most of their
    cost is the wake-ups, not the data. Blocking parks this thread (and, on a VM, may halt its
    virtual CPU) until gloo's threads signal completion. Measured on this 2-vCPU VM (2 gloo
    processes, the cpu preset's target network, 21 collectives): forward 233-293 ms blocking,
    142-164 ms polling.
    """
    if shared_memory and tensor.device.type == "cpu":
        shm = shm_communicator(group)
        if shm is not None and shm.fits(tensor):
            shm.all_reduce(tensor)
            return
    work = dist.all_reduce(tensor, group=group, async_op=True)
    while not work.is_completed():
        yield_cpu()
    work.wait()  # re-raises a failed collective's error


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance from torch's fused kernel, in at least float32."""
    if x.dtype in (torch.bfloat16, torch.float16):
        # float32 "running" buffers select torch's mixed-precision kernel: float32 statistics of
        # bf16 input without a float32 copy of it (momentum 0 leaves the buffers as they are).
        c = x.shape[1]
        return torch.batch_norm_update_stats(
            x, x.new_zeros(c, dtype=torch.float32), x.new_ones(c, dtype=torch.float32), 0.0
        )
    return torch.batch_norm_update_stats(x, None, None, 0.0)


def _affine(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor | None,
    center: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """(x - center) * scale + shift per channel, in one pass of torch's eval-mode batch-norm
    kernel (variance 1, eps 0): arithmetic in the statistics' dtype, one rounding to x's
    dtype, channels_last kept. Writes into ``out`` (a slice of a larger tensor) when given."""
    ones = torch.ones_like(center)
    if out is None:
        return torch.ops.aten.native_batch_norm(x, scale, shift, center, ones, False, 0.0, 0.0)[0]
    empty = center.new_empty(0)
    torch.ops.aten.native_batch_norm.out(
        x, scale, shift, center, ones, False, 0.0, 0.0, out=out, save_mean=empty, save_invstd=empty
    )
    return out


class _GlobalBatchNormFunction(torch.autograd.Function):
    """Normalise with given global statistics; the backward accounts for their dependence on x.

    ``x`` is ``G`` view chunks (``G = mean.shape[0]``), each normalised with its own row of
    ``mean``/``invstd`` (shape (G, C)) and ``count`` (shape (G, 1)). These come in as constants
    (computed without grad); the backward adds their gradient path, which needs the global sums
    of grad_out and grad_out * x_hat per chunk: one all-reduce for all chunks.

    Gradient scale: each process's grad_out comes from its own loss L_r (a mean over its local
    examples), and DDP averages parameter gradients over the W processes, i.e. it differentiates
    L = mean_r L_r. For local example i, dL/dy_i = grad_out_i / W, so
        dL/dx_i = (w invstd / W) (g_i - sum_all(g) / n - x_hat_i sum_all(g x_hat) / n)
    with n the global count (sums over the chunk of example i). Returning W * dL/dx_i (no 1/W)
    makes every upstream parameter gradient W times its local contribution to dL/dtheta, which
    DDP's average over W turns into the exact total. Likewise the weight/bias gradients are the
    local sums of g and g * x_hat (over all chunks, as separate passes would accumulate them),
    whose average over the processes is dL/dweight and dL/dbias. This is torch's SyncBatchNorm
    convention; with equal local batches it reproduces one process on the concatenated batch.

    Every full-size pass writes straight into the output (or grad_input) slice of its chunk:
    on CPU a ``cat`` per layer would cost several per cent of a step.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, count, group, eps, shared_memory):
        groups = mean.shape[0]
        # (x - mean) * (w invstd) + b: torch's fused kernel, for fp32 and for bf16 input with
        # fp32 statistics alike.
        scale = invstd if weight is None else weight * invstd
        y = torch.empty_like(x)
        for g, (xg, yg) in enumerate(zip(x.chunk(groups), y.chunk(groups), strict=True)):
            _affine(xg, scale[g], bias, mean[g], out=yg)
        ctx.save_for_backward(x, weight, mean, invstd, count)
        ctx.group, ctx.eps, ctx.shared_memory = group, eps, shared_memory
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, mean, invstd, count = ctx.saved_tensors
        groups, channels = mean.shape
        grad_out = grad_out.contiguous(memory_format=memory_format(x))
        w = torch.ones_like(mean[0]) if weight is None else weight
        xs, dys = x.chunk(groups), grad_out.chunk(groups)
        # One fused reduction per chunk gives sum(dy) and sum(dy * x_hat) with the global
        # mean/invstd of that chunk.
        sums = []
        for g in range(groups):
            _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
                dys[g], xs[g], w, None, None, mean[g], invstd[g], True, ctx.eps, [False, True, True]
            )
            sums.append(torch.cat([sum_dy, sum_dy_xhat]))
        local = torch.stack(sums)  # (G, 2C): [sum_dy, sum_dy_xhat] per chunk
        grad_input = grad_weight = grad_bias = None
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = local[:, channels:].sum(0).to(weight.dtype)
        if weight is not None and ctx.needs_input_grad[2]:
            grad_bias = local[:, :channels].sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            total = local.to(mean.dtype)
            all_reduce(total, ctx.group, ctx.shared_memory)
            mean_dy, mean_dy_xhat = (total / count).split(channels, dim=1)
            scale = w * invstd
            # w invstd (dy - mean_dy - x_hat mean_dy_xhat) = scale dy + k (x - mean) + c per
            # channel, each term by the fused kernel in the statistics' dtype (coefficients
            # rounded to bf16 would bias whole channels).
            k = -scale * mean_dy_xhat * invstd
            c = -scale * mean_dy
            zero = torch.zeros_like(mean[0])
            grad_input = torch.empty_like(x)
            for g, gi in enumerate(grad_input.chunk(groups)):
                _affine(xs[g], k[g], c[g], mean[g], out=gi)
                gi.add_(_affine(dys[g], scale[g], None, zero))
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


class GlobalBatchNorm(ViewGroupedNorm, nn.modules.batchnorm._BatchNorm):
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
    (see ``_GlobalBatchNormFunction``). Inside a ``view_groups(module, G)`` forward the batch is
    G view chunks, each with its own global statistics, all G in the same two collectives.
    Outside the distributed case it is exactly ``nn.BatchNorm`` (per view chunk).

    ``shared_memory``: on CPU, when every process of the group can map one shared segment
    (one host), the collectives go through it (``shm_all_reduce``: microseconds where gloo's
    loopback takes milliseconds); otherwise, or with False, through the group's backend.

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
        shared_memory: bool = True,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        self.process_group = process_group
        self.shared_memory = shared_memory

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
        groups = self.view_groups
        if not bn_training or (groups == 1 and self._world_size() == 1):
            return super().forward(input)
        if self._world_size() == 1:
            return local_view_batch_norm(self, input, super().forward)
        if input.shape[1] != self.num_features:
            raise ValueError(f"expected {self.num_features} channels, got {input.shape[1]}")
        check_groups(input, groups)

        channels = input.shape[1]
        with torch.no_grad():
            # Local moments of every view chunk (in fp32: bf16 statistics would be too coarse),
            # turned into sum and sum of squares in float64 so that E[x^2] - E[x]^2 cancels
            # only in float64. One row per chunk, all rows in one all-reduce.
            rows = []
            for chunk in input.detach().chunk(groups):
                local_mean, local_var = _moments(chunk)
                n = chunk.numel() // channels
                local_mean = local_mean.double()
                rows.append(
                    torch.cat(
                        [
                            local_mean * n,
                            (local_var.double() + local_mean * local_mean) * n,
                            local_mean.new_full((1,), n),
                        ]
                    )
                )
            stats = torch.stack(rows)
            all_reduce(stats, self.process_group, self.shared_memory)
            count = stats[:, -1:]
            mean64 = stats[:, :channels] / count
            var64 = (stats[:, channels:-1] / count - mean64 * mean64).clamp_min(0)
            dtype = torch.promote_types(input.dtype, torch.float32)
            mean, var, count = mean64.to(dtype), var64.to(dtype), count.to(dtype)
            invstd = torch.rsqrt(var + self.eps)
            if self.training and self.track_running_stats:
                # One momentum update per view, in order: what separate passes would do.
                for g in range(groups):
                    self._update_running_stats(mean[g], var[g], count[g])

        return _GlobalBatchNormFunction.apply(
            input,
            self.weight,
            self.bias,
            mean,
            invstd,
            count,
            self.process_group,
            self.eps,
            self.shared_memory,
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


class ViewSyncBatchNorm(ViewGroupedNorm, nn.SyncBatchNorm):
    """``nn.SyncBatchNorm`` (CUDA) with per-view statistics inside a ``view_groups`` forward:
    torch's own forward, and so its own collectives, once per view chunk. Correct, but it does
    not merge the views' collectives as ``GlobalBatchNorm`` does; on GPUs with NCCL they are
    cheap next to the compute."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        if self.view_groups == 1 or not bn_training:
            return super().forward(input)
        return chunkwise(super().forward, input, self.view_groups)


def synchronises_batch_norm(module: nn.Module) -> bool:
    """Whether a batch norm in ``module`` computes its statistics across processes."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    return any(
        isinstance(m, GlobalBatchNorm | ViewSyncBatchNorm)
        and dist.get_world_size(m.process_group) > 1
        for m in module.modules()
    )


def convert_sync_batchnorm(
    module: nn.Module, process_group=None, shared_memory: bool = True
) -> nn.Module:
    """Replace every BatchNorm1d/2d in ``module`` (recursively) by a batch norm with global
    statistics: ``ViewSyncBatchNorm`` (torch's ``SyncBatchNorm``) when its parameters live on
    CUDA, ``GlobalBatchNorm`` otherwise; both keep statistics per view in a ``view_groups``
    forward. Returns the converted module (a new object when ``module`` itself is a batch
    norm), like ``nn.SyncBatchNorm.convert_sync_batchnorm``.

    As in torch, the new layer takes over the old one's parameter and buffer tensors (weight,
    bias, running_mean, running_var, num_batches_tracked), so an optimizer built before the
    conversion still updates them; eps, momentum, affine, track_running_stats and the training
    flag are kept. ``shared_memory``: ``GlobalBatchNorm``'s collectives go through shared memory
    when every process is on one host (``all_reduce``); False keeps them on the backend.
    """
    out = module
    if isinstance(module, _BN_TYPES):
        probe = module.weight if module.affine else module.running_mean
        on_cuda = probe is not None and probe.is_cuda
        cls = ViewSyncBatchNorm if on_cuda else GlobalBatchNorm
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
        if isinstance(out, GlobalBatchNorm):
            out.shared_memory = shared_memory
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, process_group, shared_memory))
    return out
