"""Batched BYOL augmentations as tensor ops on the training device.

The BYOL paper (Grill et al. 2020, appendix B) and the study's appendix use the SimCLR-style
pipeline, applied per image with per-image random parameters:

    RandomResizedCrop(scale=(0.2, 1.0))                    # the paper: (0.08, 1.0) at 224 px
    RandomHorizontalFlip(p=0.5)
    RandomApply(ColorJitter(0.4, 0.4, 0.4, 0.1), p=0.8)    # the paper: saturation 0.2
    RandomGrayscale(p=0.2)
    GaussianBlur(sigma in [0.1, 2.0]) with p=0.5           # the paper's asymmetric pair: 1.0 / 0.1
    Solarize with p=0                                      # the paper's asymmetric pair: 0.0 / 0.2

Here every step runs on the whole batch at once with the per-image parameters drawn as tensors
from one generator on the images' device: per-image PIL transforms in a data loader are what
dominates a small BYOL run on CPU, and on a GPU they would leave the device idle.
On the CPU the batch then goes through in slices of about 2 MB, which keep each op's
intermediates in cache, both views' slices spread over a thread per core (``run_slices``).

The parameters follow torchvision's sampling and the ops follow torchvision's tensor kernels
(``torchvision.transforms.v2.functional``), with these differences:

* ColorJitter's random order of its four ops is drawn once per batch, where torchvision draws it
  per image: a per-image order would need every op evaluated in every position. The factors
  are per image.
* Crop and resize are one bilinear ``grid_sample`` without antialiasing: the same as
  torchvision's resize when the crop is upsampled (the usual case for small images), aliased
  where torchvision would antialias a crop that is shrunk.
* Parameters are drawn in float32 on the device, all ten RandomResizedCrop tries at once.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from byol_core.runtime import map_on_threads
from byol_core.spec import AugmentSpec

__all__ = [
    "PairAugment",
    "ViewAugment",
    "ViewParams",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "blur_kernel_size",
    "eval_transform",
    "gaussian_blur",
    "gaussian_kernels",
    "rgb_to_grayscale",
    "sample_crop_boxes",
    "solarize",
]

# torchvision's rgb_to_grayscale weights: ITU-R 601-2 luma, written 0.2989 for red there.
_LUMA = (0.2989, 0.587, 0.114)
_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_CROP_TRIES = 10
# Columns of the one (B, _N_UNIFORMS) draw per view. The layout is fixed so that the random
# stream does not depend on which ops the spec switches off.
_AREA = slice(0, _CROP_TRIES)
_LOG_RATIO = slice(_CROP_TRIES, 2 * _CROP_TRIES)
_TOP, _LEFT, _FLIP, _JITTER = 20, 21, 22, 23
_FACTORS = slice(24, 28)
_GRAY, _BLUR, _SIGMA, _SOLARIZE = 28, 29, 30, 31
_N_UNIFORMS = 32
# On CPU the batch goes through in slices of about this many floats (2 MB): the colour ops'
# dozen intermediates then stay in cache and in malloc's free lists instead of each costing a
# fresh, page-faulted 30 MB buffer per op.
_CPU_CHUNK = 1 << 19
# Columns of ViewParams.factors, and the ops of the jitter order.
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


def _per_sample(values: Tensor) -> Tensor:
    return values.reshape(-1, 1, 1, 1)


def _to_unit_float(images: Tensor) -> Tensor:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    if images.is_floating_point():  # taken to be in [0, 1] already
        return images.to(torch.float32, copy=True)
    raise TypeError(f"expected uint8 (or float in [0, 1]) images, got {images.dtype}")


@functools.lru_cache(maxsize=64)
def _constant(values: tuple[float, ...], device: torch.device) -> Tensor:
    """A small float32 constant on ``device``, made once: building it per batch would be a
    blocking host-to-device copy on a GPU. Callers must not modify it."""
    return torch.tensor(values, dtype=torch.float32, device=device)


def _scale_shift(
    mean: Sequence[float], std: Sequence[float], device: torch.device
) -> tuple[Tensor, Tensor]:
    """(x - mean) / std as x * scale + shift (``_normalise``)."""
    scale = tuple(1.0 / s for s in std)
    shift = tuple(-m / s for m, s in zip(mean, std, strict=True))
    return (
        _constant(scale, device).view(1, 3, 1, 1),
        _constant(shift, device).view(1, 3, 1, 1),
    )


def _normalise(x: Tensor, scale: Tensor, shift: Tensor, out: Tensor | None = None) -> Tensor:
    """x * scale + shift with per-channel (1, 3, 1, 1) constants, as a multiply and an add: on
    CPU one addcmul with these broadcast operands measured 2-3x slower than the two passes.
    Evaluation and the augmentation both normalise here, so an identity view equals the
    evaluation input exactly."""
    return torch.mul(x, scale, out=out).add_(shift)


def eval_transform(
    images: Tensor, size: int, mean: Sequence[float], std: Sequence[float]
) -> Tensor:
    """Evaluation preprocessing: uint8 (B, 3, H, W) -> normalised float32 (B, 3, size, size).

    Resizes (antialiased bilinear) only when the images are not ``size`` x ``size`` already,
    so for images held at the crop size it is ``x / 255`` normalised, which is also what
    ViewAugment yields for an identity crop.
    """
    x = _to_unit_float(images)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
    scale, shift = _scale_shift(mean, std, x.device)
    return _normalise(x, scale, shift)


# --------------------------------------------------------------------------- crop


def _crop_boxes(
    u_area: Tensor,
    u_log_ratio: Tensor,
    u_top: Tensor,
    u_left: Tensor,
    height: int,
    width: int,
    scale: Sequence[float],
    ratio: Sequence[float],
) -> Tensor:
    """torchvision's RandomResizedCrop.get_params with all tries of all images at once."""
    target_area = float(height * width) * (scale[0] + (scale[1] - scale[0]) * u_area)
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * u_log_ratio)
    # torch.round rounds half to even, as Python's round() in torchvision does.
    w = torch.sqrt(target_area * aspect).round_()
    h = torch.sqrt(target_area / aspect).round_()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    # argmax returns the first maximal index: torchvision's first try that fits.
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)
    found = fits.any(dim=1)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)

    # The fallback, a central crop, depends only on the image shape.
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fw, fh = round(height * max(ratio)), height
    else:
        fw, fh = width, height
    w = torch.where(found, w, float(fw))
    h = torch.where(found, h, float(fh))
    # randint(0, n + 1) as floor(u (n + 1)); the min guards u (n + 1) rounding up to n + 1.
    top = torch.minimum(torch.floor(u_top * (height - h + 1)), height - h)
    left = torch.minimum(torch.floor(u_left * (width - w + 1)), width - w)
    top = torch.where(found, top, float((height - fh) // 2))
    left = torch.where(found, left, float((width - fw) // 2))
    return torch.stack((top, left, h, w), dim=1)


def sample_crop_boxes(
    batch: int,
    height: int,
    width: int,
    scale: Sequence[float] = (0.2, 1.0),
    ratio: Sequence[float] = _RATIO,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """RandomResizedCrop boxes for ``batch`` images of ``height`` x ``width``.

    Returns float32 (batch, 4) of integral ``top, left, height, width``, sampled as
    torchvision samples them: up to ten tries of area fraction U[scale] and log aspect ratio
    U[log ratio]; the first crop that fits wins, else the central crop (of the whole image, or
    of the nearest allowed aspect ratio).
    """
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(batch, 2 * _CROP_TRIES + 2, generator=generator, device=device)
    return _crop_boxes(
        u[:, _AREA], u[:, _LOG_RATIO], u[:, -2], u[:, -1], height, width, scale, ratio
    )


def _crop_theta(boxes: Tensor, flip: Tensor, height: int, width: int) -> Tensor:
    """Per-image affine maps (B, 2, 3) from output to input coordinates, as affine_grid takes.

    With align_corners=False pixel ``k`` of the box sits at normalised ``(2k + 1) / W - 1``, so
    the box maps onto the output by its scale ``w / W`` around its centre; a negative x scale
    mirrors the crop (the horizontal flip).
    """
    top, left, h, w = boxes.unbind(dim=1)
    theta = torch.zeros(boxes.shape[0], 2, 3, dtype=boxes.dtype, device=boxes.device)
    theta[:, 0, 0] = torch.where(flip, -w, w) / width
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    return theta


def _cpu_slice(size: int) -> int:
    """Images per slice of the CPU pipeline for crops of ``size`` (about _CPU_CHUNK floats)."""
    return max(1, _CPU_CHUNK // (3 * size * size))


def _resample(images: Tensor, grid: Tensor) -> Tensor:
    """The crop, resize and flip of a ``_crop_grid``: one bilinear pass over unit-float images."""
    return F.grid_sample(
        _to_unit_float(images), grid, mode="bilinear", padding_mode="border", align_corners=False
    )


def _crop_coords(
    boxes: Tensor, flip: Tensor, height: int, width: int, size: int
) -> tuple[Tensor, Tensor]:
    """The x and y sampling coordinates (B, size) of ``_crop_grid``, before the outer product.

    The pipeline takes them once per batch: the dozen small ops here cost about as much per
    call as the grid itself on CPU, so computing them per slice would double the grid's cost.
    """
    theta = _crop_theta(boxes, flip, height, width)
    top, left, h, w = boxes.unbind(dim=1)
    # Output pixel centres, as affine_grid's linspace(-1, 1, size) * (size - 1) / size but
    # computed as (2j + 1) / size - 1, which is exact for power-of-two sizes: an identity crop
    # then samples exactly the input pixels.
    base = torch.arange(size, dtype=boxes.dtype, device=boxes.device).mul_(2).add_(1)
    base = base.div_(size).sub_(1)

    def axis(row: int, start: Tensor, extent: Tensor, full: int) -> Tensor:
        coords = torch.addcmul(theta[:, row, 2:], theta[:, row, row : row + 1], base)
        lo = (2 * start + 1) / full - 1
        hi = (2 * (start + extent) - 1) / full - 1
        return torch.clamp(coords, lo.unsqueeze(1), hi.unsqueeze(1))

    return axis(0, left, w, width), axis(1, top, h, height)


def _grid(gx: Tensor, gy: Tensor) -> Tensor:
    """The (B, size, size, 2) sampling grid of per-image x and y coordinates (B, size)."""
    n, size = gx.shape
    return torch.stack(
        (gx.unsqueeze(1).expand(n, size, size), gy.unsqueeze(2).expand(n, size, size)), dim=-1
    )


def _crop_grid(boxes: Tensor, flip: Tensor, height: int, width: int, size: int) -> Tensor:
    """``F.affine_grid(_crop_theta(...), align_corners=False)``, clamped to the boxes.

    The maps are axis-aligned, so the grid is the outer combination of (B, size) column and row
    coordinates; affine_grid's batched matmul over all B * size^2 points costs more than the
    grid_sample itself on CPU. Clamping the coordinates to the box's outer pixel centres
    reproduces resize's edge replication (torchvision crops, then resizes), so pixels outside
    the box do not bleed into the border of an upsampled crop.
    """
    return _grid(*_crop_coords(boxes, flip, height, width, size))


# --------------------------------------------------------------------------- colour
# The public ops take float images in [0, 1], (B, 3, H, W), and a (B,) tensor of per-image
# factors, and match torchvision.transforms.v2.functional.adjust_* applied image by image. The
# underscore versions work in place on a batch slice the pipeline owns. Per-image selections
# are lerps with 0/1 weights, which are exact (lerp returns its end points for weights 0 and 1)
# and several times faster on CPU than torch.where with a boolean mask.


def rgb_to_grayscale(x: Tensor) -> Tensor:
    """Luma of (B, 3, H, W) as (B, 1, H, W), summed in torchvision's order."""
    r, g, b = x.unbind(dim=1)
    return r.mul(_LUMA[0]).add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2]).unsqueeze(1)


def _brightness_(x: Tensor, factor: Tensor) -> Tensor:
    return x.mul_(_per_sample(factor)).clamp_(0.0, 1.0)


def _contrast_(x: Tensor, factor: Tensor) -> Tensor:
    # The mean of the luma is the luma of the channel means: one reduction over the image.
    r, g, b = x.mean(dim=(-2, -1)).unbind(dim=1)
    mean = r.mul(_LUMA[0]).add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2])
    f = _per_sample(factor)
    # f = 1 gives x * 1 + mean * 0 = x exactly, so identity factors leave an image untouched.
    return x.mul_(f).add_(_per_sample(mean) * (1.0 - f)).clamp_(0.0, 1.0)


def _saturation_(x: Tensor, factor: Tensor) -> Tensor:
    f = _per_sample(factor)
    grey = rgb_to_grayscale(x).mul_(1.0 - f)
    return x.mul_(f).add_(grey).clamp_(0.0, 1.0)


def _hue_(x: Tensor, factor: Tensor, weight: Tensor | None = None) -> Tensor:
    """Shift hue by ``factor`` turns through HSV, as torchvision's tensor op.

    The hue is torchvision's (Pillow's) RGB->HSV: the maximal channel picks the sector (red
    before green before blue on ties) and the other two the position in it. The way back is
    the closed form of torchvision's six-sector table, ``c_n = V - V S clamp(min(k, 4 - k),
    0, 1)`` with ``k = (n + 6 H) mod 6`` and n = 5, 3, 1 for R, G, B, rewritten as
    ``min + chroma clamp(|k - 2| - 1, 0, 1)``: a hue shift keeps ``min`` and ``chroma = V S``.
    ``weight`` (0/1 per image) keeps the images with 0 exactly as they were.
    """
    r, g, b = x.unbind(dim=1)
    # Elementwise max/min over the planes: the reductions over dim 1 are ~20x slower on CPU.
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    chroma = maxc - minc
    is_r = torch.eq(maxc, r, out=torch.empty_like(maxc))
    is_g = torch.eq(maxc, g, out=torch.empty_like(maxc))
    # Numerators of the three sectors with their offsets 0, 2, 4 (in chroma units).
    in_sector = (r - g).add_(chroma, alpha=4.0).lerp_((b - r).add_(chroma, alpha=2.0), is_g)
    in_sector.lerp_(g - b, is_r)
    # Grey pixels (chroma 0) have numerator 0; the tiny lower bound only avoids 0 / 0.
    hue6 = in_sector.div_(chroma.clamp_min(torch.finfo(x.dtype).tiny))
    hue6 = hue6.add_(factor.view(-1, 1, 1), alpha=6.0).unsqueeze(1)
    # Only |k - 2| clamped to [1, 2] matters, and that is the distance of 6 H + n - 2 to the
    # nearest multiple of 6 (k - 2 wrapped into [-3, 3)), without the slow float remainder.
    shifts = _constant((3.0, 1.0, -1.0), x.device).view(1, 3, 1, 1)
    u = hue6 + shifts
    wraps = torch.mul(u, 1.0 / 6.0).round_()
    ramp = u.sub_(wraps, alpha=6.0).abs_().clamp_(1.0, 2.0)
    # min + chroma (clamp(|k - 2|, 1, 2) - 1)
    rgb = torch.addcmul((minc - chroma).unsqueeze(1), chroma.unsqueeze(1), ramp, out=ramp)
    if weight is None:
        return x.copy_(rgb)
    return x.lerp_(rgb, _per_sample(weight))


def _grayscale_(x: Tensor, weight: Tensor) -> Tensor:
    return x.lerp_(rgb_to_grayscale(x).expand_as(x), _per_sample(weight))


def _solarize_(x: Tensor, mask: Tensor | None = None, threshold: float = 0.5) -> Tensor:
    # where(x >= 1/2, 1 - x, x) is min(x, 1 - x) (1 - x is exact for x >= 1/2), two fast passes
    # instead of a boolean where. Unmasked images compare with 3 - x > x, which keeps them.
    if threshold != 0.5:
        hit = x >= threshold
        if mask is not None:
            hit &= _per_sample(mask)
        return torch.where(hit, 1.0 - x, x, out=x)
    if mask is None:
        return torch.minimum(x, 1.0 - x, out=x)
    one = _per_sample(torch.where(mask, 1.0, 3.0).to(x.dtype))
    return torch.minimum(x, one - x, out=x)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    return _brightness_(x.clone(), factor)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    return _contrast_(x.clone(), factor)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    return _saturation_(x.clone(), factor)


def adjust_hue(x: Tensor, factor: Tensor) -> Tensor:
    return _hue_(x.clone(), factor)


def solarize(x: Tensor, mask: Tensor | None = None, threshold: float = 0.5) -> Tensor:
    """BYOL's solarisation of [0, 1] images: x -> 1 - x where x >= threshold (and ``mask``)."""
    return _solarize_(x.clone(), mask, threshold)


# --------------------------------------------------------------------------- blur


def gaussian_kernels(sigma: Tensor, kernel_size: int) -> Tensor:
    """(B, kernel_size) 1-D Gaussian kernels, built exactly as torchvision builds them."""
    lim = (kernel_size - 1) / (2.0 * math.sqrt(2.0))
    taps = torch.linspace(-lim, lim, kernel_size, dtype=sigma.dtype, device=sigma.device)
    return torch.softmax((taps / sigma.unsqueeze(1)).pow(2).neg(), dim=1)


def blur_kernel_size(sigma_max: float, crop_size: int) -> int:
    """2 ceil(3 sigma_max) + 1 taps (+-3 sigma), capped to the largest odd size <= crop."""
    return min(2 * math.ceil(3.0 * sigma_max) + 1, crop_size - (1 - crop_size % 2))


def gaussian_blur(x: Tensor, kernels: Tensor, method: str = "auto") -> Tensor:
    """Blur each image with its own separable kernel (B, K), reflect-padded as torchvision.

    ``method="conv"``: one grouped conv2d per axis with the batch folded into channels.
    ``"shift"``: the same sums as K shifted multiply-adds per axis, which on CPU is 2-3x faster
    than oneDNN's grouped convolution with per-image kernels. ``"auto"`` takes the shifts on CPU
    and the convolution elsewhere. Padding both axes first and then filtering rows and columns
    equals torchvision's 2-D convolution with the outer-product kernel on the padded image.
    """
    n, c, height, width = x.shape
    size = kernels.shape[1]
    pad = size // 2
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    if method == "auto":
        method = "shift" if x.device.type == "cpu" else "conv"
    if method == "conv":
        weight = kernels.repeat_interleave(c, dim=0)
        rows = F.conv2d(
            padded.view(1, n * c, height + 2 * pad, width + 2 * pad),
            weight.view(n * c, 1, 1, size),
            groups=n * c,
        )
        out = F.conv2d(rows, weight.view(n * c, 1, size, 1), groups=n * c)
        return out.view(n, c, height, width)
    if method != "shift":
        raise ValueError(f"unknown blur method {method!r}")
    taps = kernels.view(n, 1, 1, 1, size).unbind(dim=-1)
    rows = padded[..., 0:width] * taps[0]
    for k in range(1, size):
        rows.addcmul_(padded[..., k : k + width], taps[k])
    out = rows[:, :, 0:height] * taps[0]
    for k in range(1, size):
        out.addcmul_(rows[:, :, k : k + height], taps[k])
    return out


def _blur_selected_(x: Tensor, kernels: Tensor, selected: Tensor) -> Tensor:
    """``x`` with its ``selected`` images blurred and the others unchanged: ``x`` itself,
    modified in place, when only some are selected on the CPU; a new tensor otherwise.

    On the CPU only the selected images go through the filter (the study blurs half of them,
    and the filter's 2 x 13 passes are the pipeline's costliest op); elsewhere every image
    goes through, the unselected ones with their unit-impulse kernels, because picking the
    selected ones out would make the host wait for the device.
    """
    if x.device.type != "cpu":
        return gaussian_blur(x, kernels)
    picked = selected.nonzero().squeeze(1)
    if picked.numel() == x.shape[0]:
        return gaussian_blur(x, kernels)
    if picked.numel() > 0:
        x.index_copy_(0, picked, gaussian_blur(x.index_select(0, picked), kernels[picked]))
    return x


# --------------------------------------------------------------------------- the pipeline


def run_slices(
    slices: Sequence[Callable[[], None]], device: torch.device, threads: int = 0
) -> None:
    """Run the slice tasks of :meth:`ViewAugment.plan` on ``threads`` threads (0: torch's
    intra-op thread count) on the CPU, one after another elsewhere.

    Each CPU slice is a chain of a hundred elementwise ops on about 2 MB, which torch's
    intra-op threads split op by op, gaining little over one thread (each op's fork-join, and
    both cores waiting on the same memory). A whole slice per thread, one intra-op thread
    each, keeps every core on its own slices: 1.1x for the pair (``benchmarks.augmentation``).
    A device queues the ops of its single task whichever thread sends them.
    """
    if device.type != "cpu":
        threads = 1
    map_on_threads(lambda task: task(), slices, threads or torch.get_num_threads())


@dataclass(frozen=True)
class ViewParams:
    """Everything random about one view of one batch (tensors on the images' device)."""

    boxes: Tensor  # (B, 4) float: top, left, height, width of the crop
    flip: Tensor  # (B,) bool
    jitter: Tensor  # (B,) bool: colour jitter applied
    factors: Tensor  # (B, 4): brightness, contrast, saturation, hue; identity where not jittered
    order: tuple[int, ...]  # the jitter ops in application order, one order per batch
    grayscale: Tensor  # (B,) bool
    blur: Tensor  # (B,) bool
    sigma: Tensor  # (B,) float
    solarize: Tensor  # (B,) bool


def _draw_order(generator: torch.Generator | None) -> tuple[int, ...]:
    """The batch's random order of the four jitter ops, drawn on the host.

    Python needs the order to sequence the ops, and copying a device-side permutation back
    would synchronise with the device. A CPU generator draws it directly. A device generator's
    state lives on the host (seed and offset), so it seeds a CPU draw: the order is still a
    deterministic function of the generator, and it changes with every batch because the
    parameter draws before it advance that state.
    """
    if generator is None:
        return tuple(torch.randperm(4).tolist())
    if generator.device.type == "cpu":
        return tuple(torch.randperm(4, generator=generator).tolist())
    state = generator.get_state().numpy().tobytes()
    seed = int.from_bytes(hashlib.blake2b(state, digest_size=8).digest(), "little") >> 1
    return tuple(torch.randperm(4, generator=torch.Generator().manual_seed(seed)).tolist())


class ViewAugment:
    """One view of the BYOL pair, applied to a whole uint8 batch with per-image parameters.

    Steps, in torchvision's order: RandomResizedCrop(crop_size, crop_scale, ratio 3/4-4/3) with
    the horizontal flip folded into the same affine resampling; ColorJitter with p=jitter_p;
    grayscale with p=grayscale_p; Gaussian blur with p=blur_p[view], sigma U[blur_sigma];
    solarisation with p=solarize_p[view]; normalisation with mean/std. ``view`` picks the
    asymmetric entries (the BYOL paper: blur 1.0 / 0.1, solarisation 0.0 / 0.2).
    """

    def __init__(self, spec: AugmentSpec, view: int) -> None:
        if view not in (0, 1):
            raise ValueError(f"view must be 0 or 1, got {view}")
        self.spec = spec
        self.view = view
        # Threads for the CPU slices; 0 takes torch's intra-op thread count, 1 runs them one
        # after another on torch's intra-op threads (the benchmarks' "op by op" row).
        self.slice_threads = 0
        self.crop_size = spec.crop_size
        self.blur_p = spec.blur_p[view]
        self.solarize_p = spec.solarize_p[view]
        self.kernel_size = blur_kernel_size(spec.blur_sigma[1], spec.crop_size)
        # torchvision's ColorJitter ranges; a zero strength makes the op None there (skipped).
        strengths = (spec.brightness, spec.contrast, spec.saturation)
        self._factor_lo = (*(max(0.0, 1.0 - s) for s in strengths), -spec.hue)
        self._factor_hi = (*(1.0 + s for s in strengths), spec.hue)
        self._enabled = [s > 0 for s in strengths] + [spec.hue > 0]

    def sample(
        self,
        batch: int,
        height: int,
        width: int,
        device: torch.device | str,
        generator: torch.Generator | None = None,
    ) -> ViewParams:
        """Draw the parameters of one view for ``batch`` images of ``height`` x ``width``."""
        spec = self.spec
        device = torch.device(device)
        u = torch.rand(batch, _N_UNIFORMS, generator=generator, device=device)
        boxes = _crop_boxes(
            u[:, _AREA],
            u[:, _LOG_RATIO],
            u[:, _TOP],
            u[:, _LEFT],
            height,
            width,
            spec.crop_scale,
            _RATIO,
        )
        jitter = u[:, _JITTER] < spec.jitter_p
        lo = _constant(self._factor_lo, device)
        hi = _constant(self._factor_hi, device)
        identity = _constant((1.0, 1.0, 1.0, 0.0), device)
        factors = torch.where(jitter.unsqueeze(1), lo + (hi - lo) * u[:, _FACTORS], identity)
        sigma_lo, sigma_hi = spec.blur_sigma
        return ViewParams(
            boxes=boxes,
            flip=u[:, _FLIP] < spec.flip_p,
            jitter=jitter,
            factors=factors,
            order=_draw_order(generator),
            grayscale=u[:, _GRAY] < spec.grayscale_p,
            blur=u[:, _BLUR] < self.blur_p,
            sigma=sigma_lo + (sigma_hi - sigma_lo) * u[:, _SIGMA],
            solarize=u[:, _SOLARIZE] < self.solarize_p,
        )

    def _jitter(self, x: Tensor, factors: Tensor, order: tuple[int, ...], weight: Tensor) -> Tensor:
        """ColorJitter's ops on the slice ``x`` in the batch's ``order``, per-image factors."""
        for op in order:
            if not self._enabled[op]:
                continue
            if op == BRIGHTNESS:
                x = _brightness_(x, factors[:, op])
            elif op == CONTRAST:
                x = _contrast_(x, factors[:, op])
            elif op == SATURATION:
                x = _saturation_(x, factors[:, op])
            else:
                # A zero shift through HSV is exact only up to rounding.
                x = _hue_(x, factors[:, op], weight)
        return x

    def apply(self, images: Tensor, params: ViewParams) -> Tensor:
        """Augment ``images`` with ``params`` from :meth:`sample`."""
        out, slices = self.plan(images, params)
        run_slices(slices, images.device, self.slice_threads)
        return out

    def plan(self, images: Tensor, params: ViewParams) -> tuple[Tensor, list[Callable[[], None]]]:
        """The output buffer of :meth:`apply` and the tasks that fill it, a slice of the batch
        each (one for the whole batch off the CPU): independent, so they can run on threads."""
        n, _, height, width = images.shape
        size = self.crop_size
        out = torch.empty(n, 3, size, size, dtype=torch.float32, device=images.device)
        scale, shift = _scale_shift(self.spec.mean, self.spec.std, images.device)
        kernels = None
        if self.blur_p > 0:
            kernels = gaussian_kernels(params.sigma, self.kernel_size)
            # Unblurred images get a unit impulse, which is exact: a device filters the whole
            # batch without data-dependent indexing (the CPU only the drawn images).
            impulse = torch.zeros_like(kernels)
            impulse[:, self.kernel_size // 2] = 1.0
            kernels = torch.where(params.blur.unsqueeze(1), kernels, impulse)
        jitter_w = params.jitter.to(torch.float32)
        gray_w = params.grayscale.to(torch.float32)
        gx, gy = _crop_coords(params.boxes, params.flip, height, width, size)

        def run(rows: slice) -> None:
            x = _resample(images[rows], _grid(gx[rows], gy[rows]))
            if self.spec.jitter_p > 0:
                x = self._jitter(x, params.factors[rows], params.order, jitter_w[rows])
            if self.spec.grayscale_p > 0:
                x = _grayscale_(x, gray_w[rows])
            if kernels is not None:
                x = _blur_selected_(x, kernels[rows], params.blur[rows])
            if self.solarize_p > 0:
                x = _solarize_(x, params.solarize[rows])
            _normalise(x, scale, shift, out=out[rows])

        step = n if images.device.type != "cpu" else _cpu_slice(size)
        return out, [functools.partial(run, slice(lo, lo + step)) for lo in range(0, n, step)]

    @torch.no_grad()
    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """uint8 (B, 3, H, W) -> normalised float32 (B, 3, crop_size, crop_size)."""
        n, _, height, width = images.shape
        return self.apply(images, self.sample(n, height, width, images.device, generator))

    def __repr__(self) -> str:
        return f"ViewAugment(view={self.view}, spec={self.spec!r})"


class PairAugment:
    """The two views of BYOL's augmentation pair, each with its own blur / solarise chance."""

    def __init__(self, spec: AugmentSpec) -> None:
        self.spec = spec
        self.views = (ViewAugment(spec, 0), ViewAugment(spec, 1))

    @torch.no_grad()
    def __call__(
        self, images: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        n, _, height, width = images.shape
        # Both views' parameters first, in view order: the same draws as calling the views
        # one after the other.
        params = [view.sample(n, height, width, images.device, generator) for view in self.views]
        (v1, slices1), (v2, slices2) = (
            view.plan(images, p) for view, p in zip(self.views, params, strict=True)
        )
        # One pool for both views' slices: a barrier per view would leave a core idle at the
        # end of each.
        run_slices(slices1 + slices2, images.device, self.views[0].slice_threads)
        return v1, v2

    def __repr__(self) -> str:
        return f"PairAugment(spec={self.spec!r})"
