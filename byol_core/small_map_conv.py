"""Convolutions on small feature maps as matrix products, on the CPU.

A ResNet's last stage on 64-96 px images works on 2x2 or 3x3 maps of 512 channels. oneDNN's CPU
kernels for such maps run far below the matrix-multiply rate: the weight gradient of a
512 -> 512 3x3 convolution on 64 maps of 2x2 took 14.6 ms in bf16 on an AMX CPU, against 2.4 ms
as one product of the output gradient with the unfolded input (im2col), and 12.8 against 4.9 ms
in fp32 (docs/benchmarks.md, "small feature maps"). On such maps the unfolded input is barely
larger than the input itself (every position touches the padding), so the product costs what the
arithmetic costs. It is the same sum, accumulated in fp32 by the matrix multiply as by the
convolution, so the results agree within rounding.

``SmallMapConv2d`` takes that route for the forward, the weight gradient and the input
gradient each up to the output size where it measured faster (``LIMITS``, by precision); every
other case, and every device but the CPU, is torch's own convolution.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Limits:
    """Output positions (H x W) up to which each part is a product: where it measured faster
    than oneDNN on this project's CPUs (2026-12-04, AMX; docs/benchmarks.md "Small feature
    maps"), 64 images of 64-512 channels. Each part they route through a product also gained
    in bf16 on an AVX512-BF16 CPU without AMX (docs/benchmarks.md, "The runs compared")."""

    forward: int
    weight_grad: int
    input_grad: int


# Forward through 3x3 (bf16 1.0-2.0x, fp32 1.2-1.8x; at 4x4 0.9x below 512 channels). Weight
# gradient in bf16 through 4x4 (2.1-5x; at 8x8 0.9x), in fp32 through 3x3 (1.1-1.9x; at 4x4
# 0.9-1.1x). Input gradient through 2x2 (bf16 1.3-4.5x, fp32 2.6-2.8x; at 3x3 it gained for
# 512 output channels and lost for 256, 0.7x).
LIMITS = {torch.bfloat16: Limits(9, 16, 4), torch.float32: Limits(9, 9, 4)}
MAX_POSITIONS = max(max(vars(limits).values()) for limits in LIMITS.values())


def _limits(dtype: torch.dtype) -> Limits:
    return LIMITS.get(dtype, LIMITS[torch.float32])


def _output_positions(size: tuple[int, int], kernel, stride, padding, dilation) -> tuple[int, int]:
    """Output height and width of a convolution on a ``size`` map (torch's formula)."""
    return tuple(
        (n + 2 * p - d * (k - 1) - 1) // s + 1
        for n, k, s, p, d in zip(size, kernel, stride, padding, dilation, strict=True)
    )


def conv_args(conv: nn.Conv2d) -> tuple:
    """The constructor arguments that rebuild ``conv`` as another Conv2d class."""
    return (
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
    )  # fmt: skip


def _im2col_rows(x: torch.Tensor, kernel, dilation, padding, stride) -> torch.Tensor:
    """The unfolded input as one row per (image, output position), each row ordered (kh, kw, C):
    (N * L, kh * kw * C). That order is the memory order of a channels_last input and weight,
    so gathering the rows is one copy and the weight's matrix (``_weight_matrix``) none; F.unfold
    orders (C, kh, kw), which cost a copy of every weight on every call and one more of the
    rows (3x slower for 512 -> 512 on 2x2 maps)."""
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = kernel, dilation, padding, stride
    nhwc = F.pad(x, (pw, pw, ph, ph)).permute(0, 2, 3, 1)
    windows = nhwc.unfold(1, dh * (kh - 1) + 1, sh).unfold(2, dw * (kw - 1) + 1, sw)
    # (N, Ho, Wo, C, kh, kw) after the dilation's stride; rows put C last
    windows = windows[..., ::dh, ::dw].permute(0, 1, 2, 4, 5, 3)
    return windows.reshape(-1, kh * kw * x.shape[1])


def _weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """(out, kh * kw * in), the rows' order: a view of a channels_last weight."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def _grad_input(
    grad_y: torch.Tensor, weight: torch.Tensor, x: torch.Tensor, stride, padding, dilation
) -> torch.Tensor:
    """The input gradient as one product of the output gradient with the weight's matrix (the
    gradient of every row ``_im2col_rows`` gathered) and their scatter back onto the padded
    input (col2im), summed in fp32 as oneDNN sums it."""
    n, c, h, w = x.shape
    out_c, _, kh, kw = weight.shape
    ho, wo = grad_y.shape[2:]
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    rows = grad_y.permute(0, 2, 3, 1).reshape(-1, out_c) @ _weight_matrix(weight)
    rows = rows.view(n, ho, wo, kh, kw, c)
    padded = torch.zeros(n, h + 2 * ph, w + 2 * pw, c, dtype=torch.float32, device=x.device)
    for i in range(kh):
        for j in range(kw):
            top, left = i * dh, j * dw
            hit = padded[
                :, top : top + sh * (ho - 1) + 1 : sh, left : left + sw * (wo - 1) + 1 : sw
            ]
            hit += rows[:, :, :, i, j]
    # NHWC seen as NCHW: channels_last, the layout torch's convolution gives back
    return padded[:, ph : ph + h, pw : pw + w].permute(0, 3, 1, 2).to(x.dtype)


class _SmallMapConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation):
        n = x.shape[0]
        out_c, _, kh, kw = weight.shape
        ho, wo = _output_positions(x.shape[2:], (kh, kw), stride, padding, dilation)
        rows = None
        if ho * wo <= _limits(x.dtype).forward:
            rows = _im2col_rows(x, (kh, kw), dilation, padding, stride)
            y = rows @ _weight_matrix(weight).t()
            if bias is not None:
                y = y + bias
            # (N, Ho, Wo, C) viewed as NCHW is the channels_last layout torch's conv returns.
            y = y.view(n, ho, wo, out_c).permute(0, 3, 1, 2)
        else:
            y = F.conv2d(x, weight, bias, stride, padding, dilation)
        # The weight gradient's product needs these rows again: kept, they are not gathered
        # twice (their copy is most of a small map's gather cost).
        keep_rows = rows is not None and ctx.needs_input_grad[1]
        ctx.save_for_backward(x, weight, rows if keep_rows else None)
        ctx.conv = (stride, padding, dilation, bias is not None)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, rows = ctx.saved_tensors
        stride, padding, dilation, has_bias = ctx.conv
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        positions = grad_y.shape[2] * grad_y.shape[3]
        limits = _limits(x.dtype)
        x_as_product = need_x and positions <= limits.input_grad
        w_as_product = need_w and positions <= limits.weight_grad
        grad_x = grad_w = grad_b = None
        if (need_x and not x_as_product) or (need_w and not w_as_product):
            grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
                grad_y, x, weight, None, stride, padding, dilation, False, [0, 0], 1,
                [need_x and not x_as_product, need_w and not w_as_product, False],
            )  # fmt: skip
        if x_as_product:
            grad_x = _grad_input(grad_y, weight, x, stride, padding, dilation)
        if w_as_product:
            out_c = weight.shape[0]
            if rows is None:
                rows = _im2col_rows(x, weight.shape[2:], dilation, padding, stride)
            grad_rows = grad_y.permute(0, 2, 3, 1).reshape(-1, out_c)
            # (out, kh, kw, in) seen as (out, in, kh, kw): channels_last, as the weight is
            grad_w = (grad_rows.t() @ rows).view(out_c, *weight.shape[2:], -1).permute(0, 3, 1, 2)
        if has_bias and need_b:
            grad_b = grad_y.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None


# (weight, grad mode) -> (weight, its autocast-dtype copy) inside ``cast_once``, else None.
_casts: ContextVar[dict | None] = ContextVar("small_map_conv_casts", default=None)


@contextlib.contextmanager
def cast_once() -> Iterator[None]:
    """Within, each weight is cast to autocast's dtype once however often it is used, as
    autocast caches its own casts of a convolution's weight; the weights must not change
    inside. A custom Function is not autocast, so ``SmallMapConv2d`` casts its weight itself:
    without this, a BYOL step cast each one per view for the online and the target network and
    each view's gradient back, seven copies of every 512 x 512 x 3 x 3 weight; within it, four
    (benchmark step 2-3 % faster, interleaved A/B in one process)."""
    token = _casts.set({})
    try:
        yield
    finally:
        _casts.reset(token)


class _Cast(torch.autograd.Function):
    """``weight.to(dtype)`` whose gradient comes back laid out exactly as the weight. Summed over
    several uses of one cast, autograd lays the gradient of a 1x1 kernel out contiguously (its
    channels_last strides are ambiguous), which DDP flags against its buckets and copies."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        ctx.layout = (weight.shape, weight.stride(), weight.dtype, weight.device)
        return weight.to(dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        shape, stride, dtype, device = ctx.layout
        return torch.empty_strided(shape, stride, dtype=dtype, device=device).copy_(grad), None


def _cast(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    cache = _casts.get()
    if cache is None:
        return weight.to(dtype)
    # A copy made without grad has no path back to the weight: never hand it to a forward
    # that needs one. The weight is kept in the value, so its id cannot be reused meanwhile.
    key = (id(weight), dtype, torch.is_grad_enabled())
    hit = cache.get(key)
    if hit is None:
        hit = cache[key] = (weight, _Cast.apply(weight, dtype))
    return hit[1]


class SmallMapConv2d(nn.Conv2d):
    """``nn.Conv2d`` that computes small output maps on the CPU as matrix products (module
    docstring). Same parameters and state dict as ``nn.Conv2d``. ``max_positions = 0`` on an
    instance makes it torch's convolution throughout (the benchmark's lever-off row)."""

    max_positions = MAX_POSITIONS

    def _conv_forward(
        self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        if not self._small_map(input):
            return super()._conv_forward(input, weight, bias)
        if torch.is_autocast_enabled("cpu"):
            # A custom Function is not autocast: cast as autocast casts a convolution.
            dtype = torch.get_autocast_dtype("cpu")
            input, weight = input.to(dtype), _cast(weight, dtype)
            bias = bias.to(dtype) if bias is not None else None
        return _SmallMapConv.apply(input, weight, bias, self.stride, self.padding, self.dilation)

    def _small_map(self, x: torch.Tensor) -> bool:
        if (
            x.device.type != "cpu"
            or x.dim() != 4
            or self.groups != 1
            or self.padding_mode != "zeros"
            or isinstance(self.padding, str)
        ):
            return False
        ho, wo = _output_positions(
            x.shape[2:], self.kernel_size, self.stride, self.padding, self.dilation
        )
        return ho * wo <= self.max_positions


def small_map_convs(module: nn.Module) -> None:
    """Make every plain ``nn.Conv2d`` under ``module`` a ``SmallMapConv2d`` in place (subclasses,
    which may compute their own weight, are left alone)."""
    for name, child in module.named_children():
        if type(child) is nn.Conv2d:
            # skip_init: no random initialisation, so building an encoder draws from the RNG
            # exactly as before and a seed still gives the same weights.
            conv = nn.utils.skip_init(
                SmallMapConv2d,
                *conv_args(child),
                device=child.weight.device,
                dtype=child.weight.dtype,
            )
            conv.load_state_dict(child.state_dict())
            setattr(module, name, conv)
        else:
            small_map_convs(child)
