"""Tests of the batched BYOL augmentations against torchvision's per-image reference ops."""

from __future__ import annotations

import itertools
import math
import threading

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import RandomResizedCrop

from byol_core import augment as A
from byol_core.augment import PairAugment, ViewAugment, eval_transform, sample_crop_boxes
from byol_core.spec import AugmentSpec

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# Everything random switched off; the crop is the whole image.
IDENTITY = dict(
    crop_scale=(1.0, 1.0),
    flip_p=0.0,
    jitter_p=0.0,
    grayscale_p=0.0,
    blur_p=(0.0, 0.0),
    solarize_p=(0.0, 0.0),
)


def uint8_images(n: int, size: int | tuple[int, int] = 32, seed: int = 0) -> torch.Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=g)


def smooth_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Random colour blobs: images with structure, so crops and flips change them visibly."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g)
    x = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def unit(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255


def denormalise(x: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    return x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(("crop", "shape"), [(32, (32, 32)), (24, (40, 40)), (32, (24, 48))])
def test_output_shape_dtype_and_finite(crop: int, shape: tuple[int, int]) -> None:
    spec = AugmentSpec(crop_size=crop, solarize_p=(0.5, 0.5))
    v1, v2 = PairAugment(spec)(uint8_images(16, shape), seeded(0))
    for v in (v1, v2):
        assert v.shape == (16, 3, crop, crop)
        assert v.dtype == torch.float32
        assert v.is_contiguous()
        assert torch.isfinite(v).all()
        # Normalised [0, 1] values lie between -mean / std and (1 - mean) / std.
        lo = -torch.tensor(MEAN) / torch.tensor(STD)
        hi = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
        per_channel = v.transpose(0, 1).reshape(3, -1)
        assert (per_channel.min(1).values >= lo - 1e-5).all()
        assert (per_channel.max(1).values <= hi + 1e-5).all()


def test_identity_crop_is_exact_and_normalised() -> None:
    images = uint8_images(8, 32)
    spec = AugmentSpec(crop_size=32, **IDENTITY)
    out = ViewAugment(spec, 0)(images, seeded(1))
    expected = eval_transform(images, 32, MEAN, STD)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    manual = (unit(images) - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(
        1, 3, 1, 1
    )
    torch.testing.assert_close(out, manual, atol=1e-5, rtol=0)


def test_identity_crop_at_96_px_is_exact_up_to_grid_rounding() -> None:
    # grid_sample's normalised coordinates are not exact for sizes that are not powers of two:
    # the sampling points sit ~1e-6 pixel off, which moves values by a few 1e-6.
    images = uint8_images(4, 96)
    spec = AugmentSpec(crop_size=96, **IDENTITY)
    out = ViewAugment(spec, 0)(images, seeded(1))
    torch.testing.assert_close(out, eval_transform(images, 96, MEAN, STD), atol=1e-4, rtol=0)


def test_identity_upsampling_equals_eval_resize() -> None:
    images = uint8_images(4, 16)
    spec = AugmentSpec(crop_size=32, **IDENTITY)
    out = ViewAugment(spec, 0)(images, seeded(1))
    torch.testing.assert_close(out, eval_transform(images, 32, MEAN, STD), atol=1e-5, rtol=0)


def test_custom_mean_std_are_used() -> None:
    images = uint8_images(2, 16)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    spec = AugmentSpec(crop_size=16, mean=mean, std=std, **IDENTITY)
    out = ViewAugment(spec, 0)(images, seeded(0))
    torch.testing.assert_close(denormalise(out, mean, std), unit(images), atol=1e-6, rtol=0)
    torch.testing.assert_close(eval_transform(images, 16, mean, std), out, atol=1e-6, rtol=0)


def test_eval_transform_resizes_with_antialias() -> None:
    images = uint8_images(3, 64)
    out = eval_transform(images, 32, MEAN, STD)
    expected = F.interpolate(unit(images), size=(32, 32), mode="bilinear", antialias=True)
    torch.testing.assert_close(denormalise(out), expected, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- randomness


def test_copies_of_one_image_get_different_views() -> None:
    images = smooth_images(1, 32).expand(8, 3, 32, 32).contiguous()
    for view in PairAugment(AugmentSpec(crop_size=32))(images, seeded(3)):
        for i, j in itertools.combinations(range(8), 2):
            assert (view[i] - view[j]).abs().max() > 0.05, (i, j)


def test_copies_of_one_image_get_different_crops() -> None:
    images = smooth_images(1, 32).expand(8, 3, 32, 32).contiguous()
    spec = AugmentSpec(crop_size=32, **{**IDENTITY, "crop_scale": (0.2, 1.0)})
    out = ViewAugment(spec, 0)(images, seeded(4))
    for i, j in itertools.combinations(range(8), 2):
        assert (out[i] - out[j]).abs().max() > 0.05, (i, j)


def test_brightness_factor_is_drawn_per_image() -> None:
    # Values in [50, 150] / 255 never clip at factors <= 1.4, so out / in is the factor.
    g = seeded(5)
    image = torch.randint(50, 151, (1, 3, 32, 32), dtype=torch.uint8, generator=g)
    images = image.expand(8, 3, 32, 32).contiguous()
    spec = AugmentSpec(
        crop_size=32, **{**IDENTITY, "jitter_p": 1.0}, contrast=0, saturation=0, hue=0
    )
    out = denormalise(ViewAugment(spec, 0)(images, g))
    ratio = out / unit(images)
    factors = ratio.flatten(1).mean(1)
    assert torch.allclose(ratio, factors.view(8, 1, 1, 1).expand_as(ratio), atol=1e-4)
    assert ((factors >= 0.6 - 1e-4) & (factors <= 1.4 + 1e-4)).all()
    assert torch.cdist(factors[:, None], factors[:, None]).add(torch.eye(8)).min() > 1e-3


def test_unjittered_images_are_untouched() -> None:
    images = smooth_images(64, 32, seed=6)
    spec = AugmentSpec(crop_size=32, **{**IDENTITY, "jitter_p": 0.5})
    view = ViewAugment(spec, 0)
    g = seeded(7)
    params = view.sample(64, 32, 32, "cpu", g)
    out = view.apply(images, params)
    same = (out == eval_transform(images, 32, MEAN, STD)).flatten(1).all(1)
    assert 8 < int(params.jitter.sum()) < 56
    assert torch.equal(same, ~params.jitter)


def test_same_seed_same_output_and_different_seed_different_output() -> None:
    images = uint8_images(16, 40)
    pair = PairAugment(AugmentSpec(crop_size=32, solarize_p=(0.3, 0.3)))
    a = pair(images, seeded(11))
    b = pair(images, seeded(11))
    c = pair(images, seeded(12))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert all((x - y).abs().max() > 0.1 for x, y in zip(a, c, strict=True))
    # The two views of one call differ too.
    assert (a[0] - a[1]).abs().max() > 0.1


def test_global_rng_without_generator_is_reproducible() -> None:
    images = uint8_images(4, 32)
    view = ViewAugment(AugmentSpec(crop_size=32), 0)
    torch.manual_seed(0)
    a = view(images)
    torch.manual_seed(0)
    assert torch.equal(a, view(images))


def test_jitter_order_is_drawn_per_batch() -> None:
    view = ViewAugment(AugmentSpec(crop_size=32), 0)
    g = seeded(13)
    orders = {view.sample(2, 32, 32, "cpu", g).order for _ in range(40)}
    assert len(orders) > 5
    assert all(sorted(order) == [0, 1, 2, 3] for order in orders)


class _DeviceGeneratorStub:
    """Stands in for a CUDA generator: its state (seed, offset) is a host tensor."""

    device = torch.device("cuda")

    def __init__(self, offset: int) -> None:
        self.offset = offset

    def get_state(self) -> torch.Tensor:
        return torch.tensor([7, 0, 0, 0, self.offset % 256, self.offset // 256], dtype=torch.uint8)


def test_jitter_order_of_a_device_generator_follows_its_state() -> None:
    assert A._draw_order(_DeviceGeneratorStub(3)) == A._draw_order(_DeviceGeneratorStub(3))
    orders = {A._draw_order(_DeviceGeneratorStub(offset)) for offset in range(0, 4000, 100)}
    assert len(orders) > 5


# --------------------------------------------------------------------------- ops vs torchvision


def test_colour_ops_match_torchvision_per_image() -> None:
    x = unit(uint8_images(12, 16, seed=20))
    x[0] = 0.5  # grey: no hue, no saturation
    x[1, 0] = x[1, 1]  # red = green ties
    x[2] = 0.0
    x[3] = 1.0
    g = seeded(21)
    cases = {
        "brightness": (A.adjust_brightness, TF.adjust_brightness, torch.rand(12, generator=g) * 2),
        "contrast": (A.adjust_contrast, TF.adjust_contrast, torch.rand(12, generator=g) * 2),
        "saturation": (A.adjust_saturation, TF.adjust_saturation, torch.rand(12, generator=g) * 2),
        "hue": (A.adjust_hue, TF.adjust_hue, torch.rand(12, generator=g) - 0.5),
    }
    cases["hue"][2][4:8] = torch.tensor([0.5, -0.5, 0.0, 0.25])
    cases["contrast"][2][4] = 0.0
    for name, (ours, theirs, factors) in cases.items():
        expected = torch.stack([theirs(x[i], float(factors[i])) for i in range(12)])
        torch.testing.assert_close(ours(x, factors), expected, atol=1e-4, rtol=0, msg=name)


def test_colour_ops_do_not_modify_their_input() -> None:
    x = unit(uint8_images(2, 8))
    before = x.clone()
    for op in (A.adjust_brightness, A.adjust_contrast, A.adjust_saturation, A.adjust_hue):
        op(x, torch.tensor([0.3, 0.2]))
    A.solarize(x)
    assert torch.equal(x, before)


def test_grayscale_matches_torchvision() -> None:
    x = unit(uint8_images(4, 16))
    torch.testing.assert_close(A.rgb_to_grayscale(x), TF.rgb_to_grayscale(x), atol=1e-6, rtol=0)
    spec = AugmentSpec(crop_size=16, **{**IDENTITY, "grayscale_p": 1.0})
    out = denormalise(ViewAugment(spec, 0)(unit(uint8_images(4, 16)), seeded(0)))
    expected = TF.rgb_to_grayscale(x, num_output_channels=3)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_solarize_matches_torchvision() -> None:
    x = unit(uint8_images(4, 16))
    x[0, 0, 0, :3] = torch.tensor([0.5, 0.5 - 1e-7, 1.0])
    assert torch.equal(A.solarize(x), TF.solarize(x, 0.5))
    mask = torch.tensor([True, False, True, False])
    out = A.solarize(x, mask)
    assert torch.equal(out[mask], TF.solarize(x[mask], 0.5))
    assert torch.equal(out[~mask], x[~mask])
    assert torch.equal(A.solarize(x, threshold=0.3), TF.solarize(x, 0.3))


@pytest.mark.parametrize("method", ["conv", "shift"])
def test_blur_matches_torchvision(method: str) -> None:
    x = unit(uint8_images(5, (20, 24)))
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.7, 2.0])
    size = A.blur_kernel_size(2.0, 20)
    out = A.gaussian_blur(x, A.gaussian_kernels(sigma, size), method=method)
    expected = torch.stack(
        [TF.gaussian_blur(x[i], [size, size], [float(s), float(s)]) for i, s in enumerate(sigma)]
    )
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("picked", [[], [1, 3, 4], [0, 1, 2, 3, 4, 5]])
def test_blurring_only_the_selected_images_on_cpu_is_exact(picked: list[int]) -> None:
    """The CPU path filters only the selected images; every other device filters all of them
    with unit impulses for the others. Both must give the same batch, bit for bit."""
    x = unit(uint8_images(6, 24, seed=3))
    selected = torch.zeros(6, dtype=torch.bool)
    selected[picked] = True
    kernels = A.gaussian_kernels(torch.linspace(0.3, 2.0, 6), 13)
    impulse = torch.zeros_like(kernels)
    impulse[:, 6] = 1.0
    kernels = torch.where(selected.unsqueeze(1), kernels, impulse)
    everyone = A.gaussian_blur(x, kernels)
    out = A._blur_selected_(x.clone(), kernels, selected)
    assert torch.equal(out[~selected], x[~selected])
    assert torch.equal(out, everyone)
    if picked:
        assert not torch.equal(out[selected], x[selected])


def test_blur_kernel_size() -> None:
    assert A.blur_kernel_size(2.0, 96) == 13
    assert A.blur_kernel_size(2.0, 10) == 9
    assert A.blur_kernel_size(2.0, 9) == 9
    assert A.blur_kernel_size(0.5, 32) == 5


def test_crop_and_flip_match_torchvision_resized_crop() -> None:
    images = unit(smooth_images(32, 32, seed=30))
    spec = AugmentSpec(crop_size=32, **{**IDENTITY, "crop_scale": (0.08, 1.0), "flip_p": 0.5})
    view = ViewAugment(spec, 0)
    params = view.sample(32, 32, 32, "cpu", seeded(31))
    assert 0 < int(params.flip.sum()) < 32
    out = denormalise(view.apply(images, params))
    for i in range(32):
        top, left, h, w = (int(v) for v in params.boxes[i])
        expected = TF.resized_crop(images[i], top, left, h, w, [32, 32], antialias=True)
        if params.flip[i]:
            expected = TF.horizontal_flip(expected)
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=0, msg=f"image {i}")


def test_crop_grid_is_the_clamped_affine_grid() -> None:
    height, width, size = 40, 56, 32
    boxes = sample_crop_boxes(64, height, width, (0.08, 1.0), generator=seeded(32))
    flip = torch.rand(64, generator=seeded(33)) < 0.5
    theta = A._crop_theta(boxes, flip, height, width)
    expected = F.affine_grid(theta, [64, 3, size, size], align_corners=False)
    top, left, h, w = boxes.unbind(1)
    lo = torch.stack(((2 * left + 1) / width - 1, (2 * top + 1) / height - 1), 1)
    hi = torch.stack(((2 * (left + w) - 1) / width - 1, (2 * (top + h) - 1) / height - 1), 1)
    expected = torch.clamp(expected, lo.view(64, 1, 1, 2), hi.view(64, 1, 1, 2))
    grid = A._crop_grid(boxes, flip, height, width, size)
    torch.testing.assert_close(grid, expected, atol=1e-6, rtol=0)


def reference_view(images: torch.Tensor, view: ViewAugment, params: A.ViewParams) -> torch.Tensor:
    """The view, one image at a time with torchvision's ops and the sampled parameters."""
    spec, size = view.spec, view.crop_size
    outs = []
    for i in range(images.shape[0]):
        top, left, h, w = (int(v) for v in params.boxes[i])
        x = TF.resized_crop(images[i], top, left, h, w, [size, size], antialias=True)
        if params.flip[i]:
            x = TF.horizontal_flip(x)
        if params.jitter[i]:
            ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
            for op in params.order:
                x = ops[op](x, float(params.factors[i, op]))
        if params.grayscale[i]:
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        if params.blur[i]:
            s = float(params.sigma[i])
            x = TF.gaussian_blur(x, [view.kernel_size] * 2, [s, s])
        if params.solarize[i]:
            x = TF.solarize(x, 0.5)
        outs.append(TF.normalize(x, list(spec.mean), list(spec.std)))
    return torch.stack(outs)


@pytest.mark.parametrize("crop", [32, 24])
def test_whole_view_matches_torchvision_per_image(crop: int) -> None:
    spec = AugmentSpec(
        crop_size=crop, grayscale_p=0.3, blur_p=(0.5, 0.5), solarize_p=(0.5, 0.5), hue=0.5
    )
    view = ViewAugment(spec, 0)
    images = smooth_images(48, 32, seed=40)
    params = view.sample(48, 32, 32, "cpu", seeded(41))
    for flags in (params.jitter, params.grayscale, params.blur, params.solarize, params.flip):
        assert 0 < int(flags.sum()) < 48
    out = view.apply(images, params)
    # Only the crop is compared at 24 px where torchvision would antialias a shrinking resize.
    if crop == 32:
        expected = reference_view(unit(images), view, params)
        torch.testing.assert_close(out, expected, atol=2e-4, rtol=0)
    else:
        assert out.shape == (48, 3, 24, 24)


def test_asymmetric_pair_blurs_only_the_first_view() -> None:
    images = uint8_images(16, 32)  # noise: all energy at high frequencies
    spec = AugmentSpec(crop_size=32, **{**IDENTITY, "blur_p": (1.0, 0.0)}, blur_sigma=(1.0, 2.0))
    v1, v2 = PairAugment(spec)(images, seeded(50))

    def high_frequency_energy(x: torch.Tensor) -> torch.Tensor:
        x = denormalise(x)
        dx = x[..., :, 1:] - x[..., :, :-1]
        dy = x[..., 1:, :] - x[..., :-1, :]
        return dx.pow(2).flatten(1).mean(1) + dy.pow(2).flatten(1).mean(1)

    assert (high_frequency_energy(v1) < 0.3 * high_frequency_energy(v2)).all()
    torch.testing.assert_close(v2, eval_transform(images, 32, MEAN, STD), atol=1e-5, rtol=0)


def test_ops_with_probability_zero_are_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args, **kwargs):
        raise AssertionError("op ran although its probability is 0")

    for name in ("gaussian_blur", "_solarize_", "_hue_", "_grayscale_"):
        monkeypatch.setattr(A, name, forbidden)
    spec = AugmentSpec(crop_size=16, jitter_p=0, grayscale_p=0, blur_p=(0, 0))
    PairAugment(spec)(uint8_images(4, 16), seeded(0))


# --------------------------------------------------------------------------- CPU slices on threads


def test_slices_on_threads_equal_the_slices_op_by_op(
    two_torch_threads, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both views' CPU slices run on a thread each with one intra-op thread; the views must be
    the ones the slices give op by op on torch's threads, and torch's thread count must be
    back afterwards."""
    spec = AugmentSpec(crop_size=32, blur_p=(0.5, 0.5), solarize_p=(0.2, 0.2))
    images = smooth_images(300, 40, seed=8)  # 300 images of 32 px: two slices a view
    threaded, serial = PairAugment(spec), PairAugment(spec)
    for view in serial.views:
        view.slice_threads = 1
    seen: set[tuple[int, int]] = set()  # (thread, its torch thread count) per slice
    resample = A._resample
    # The threaded call's four slices pass in pairs, so one pool thread cannot take them all.
    pairs: list[threading.Barrier] = [threading.Barrier(2, timeout=30)]

    def recording(*args, **kwargs):
        seen.add((threading.get_ident(), torch.get_num_threads()))
        if pairs:
            pairs[0].wait()
        return resample(*args, **kwargs)

    monkeypatch.setattr(A, "_resample", recording)
    got = threaded(images, seeded(5))
    pairs.clear()
    assert len(seen) == 2 and {count for _, count in seen} == {1}
    assert threading.get_ident() not in {thread for thread, _ in seen}
    assert torch.get_num_threads() == 2
    seen.clear()
    expected = serial(images, seeded(5))
    assert seen == {(threading.get_ident(), 2)}
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=0)
    # ViewAugment's own call takes the same path.
    torch.testing.assert_close(
        ViewAugment(spec, 0)(images, seeded(2)), serial.views[0](images, seeded(2))
    )


# --------------------------------------------------------------------------- crop sampling


def test_crop_boxes_respect_scale_and_ratio() -> None:
    n, height, width = 20000, 500, 500
    scale = (0.2, 1.0)
    boxes = sample_crop_boxes(n, height, width, scale, generator=seeded(60))
    top, left, h, w = boxes.unbind(1)
    assert torch.equal(boxes, boxes.round())
    assert ((top >= 0) & (left >= 0) & (top + h <= height) & (left + w <= width)).all()
    assert ((h > 0) & (w > 0)).all()

    fallback = (h == height) & (w == width) & (top == 0) & (left == 0)
    sampled = ~fallback
    area = (h * w / (height * width))[sampled]
    aspect = (w / h)[sampled]
    # Rounding w and h to whole pixels moves area and aspect by < 0.5 %.
    assert area.min() >= scale[0] * 0.995
    assert area.max() <= scale[1]
    assert aspect.min() >= 0.75 * 0.995
    assert aspect.max() <= 4 / 3 * 1.005
    # The range is covered, log aspect ratios are uniform (mean ~ 0), and tries that do not fit
    # are retried: the fallback stays rare.
    assert area.min() < 0.21
    assert area.max() > 0.99
    assert abs(float(aspect.log().mean())) < 0.01
    assert float(fallback.float().mean()) < 0.01


def test_crop_boxes_distribution_matches_torchvision() -> None:
    n, height, width = 4000, 32, 48
    scale = (0.08, 1.0)
    ours = sample_crop_boxes(n, height, width, scale, generator=seeded(61))
    torch.manual_seed(62)
    image = torch.zeros(3, height, width)
    theirs = torch.tensor(
        [RandomResizedCrop.get_params(image, list(scale), [3 / 4, 4 / 3]) for _ in range(n)],
        dtype=torch.float32,
    )

    def area_fraction(boxes: torch.Tensor) -> torch.Tensor:
        return boxes[:, 2] * boxes[:, 3] / (height * width)

    assert abs(float(area_fraction(ours).mean() - area_fraction(theirs).mean())) < 0.02
    assert abs(float(area_fraction(ours).std() - area_fraction(theirs).std())) < 0.02
    # The 3:2 image rarely falls back to the central crop (3/4-4/3 ratio of the whole height).
    fallback = torch.tensor([0.0, 2.0, 32.0, 43.0])
    rate = [float((b == fallback).all(1).float().mean()) for b in (ours, theirs)]
    assert abs(rate[0] - rate[1]) < 0.02
    # Top/left are uniform over the valid offsets: mean relative offset ~ 1/2 for both.
    for boxes in (ours, theirs):
        rel_top = boxes[:, 0] / (height - boxes[:, 2]).clamp_min(1)
        slack = (height - boxes[:, 2]) > 0
        assert abs(float(rel_top[slack].mean()) - 0.5) < 0.03


def test_crop_fallback_is_the_central_crop_of_the_largest_allowed_ratio() -> None:
    # A 2:1 image and 90-100 % of its area cannot fit any ratio <= 4/3: every try fails.
    height, width = 48, 96
    boxes = sample_crop_boxes(64, height, width, (0.9, 1.0), generator=seeded(63))
    image = torch.zeros(3, height, width)
    expected = RandomResizedCrop.get_params(image, [0.9, 1.0], [3 / 4, 4 / 3])
    assert expected == (0, 16, 48, 64)
    assert torch.equal(boxes, torch.tensor([expected] * 64, dtype=torch.float32))


def test_sampled_crop_size_rounding_matches_python_round() -> None:
    # torchvision computes int(round(sqrt(area * ratio))) in double precision; ours is float32.
    g = seeded(64)
    u = torch.rand(1000, 2 * A._CROP_TRIES + 2, generator=g)
    boxes = A._crop_boxes(u[:, :10], u[:, 10:20], u[:, 20], u[:, 21], 64, 64, (0.2, 1.0), A._RATIO)
    log_lo, log_hi = math.log(3 / 4), math.log(4 / 3)
    mismatches = 0
    for i in range(1000):
        for t in range(10):
            area = 64 * 64 * (0.2 + 0.8 * float(u[i, t]))
            ratio = math.exp(log_lo + (log_hi - log_lo) * float(u[i, 10 + t]))
            w, h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < w <= 64 and 0 < h <= 64:
                mismatches += (int(boxes[i, 3]), int(boxes[i, 2])) != (w, h)
                break
    assert mismatches <= 2
