"""Tests for byol_core.data: generated, bundled, torchvision and ImageFolder datasets."""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from byol_core.data import (
    SHAPE_CLASSES,
    DataError,
    DataSplits,
    ImageSet,
    decode_files,
    load_data,
)
from byol_core.spec import DataSpec

CIFAR = Path(__file__).resolve().parents[2] / "shared/data/cifar10"
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


def _check_set(s: ImageSet, size: int, n_classes: int, *, unlabelled: bool = False) -> None:
    assert s.images.dtype == torch.uint8
    assert s.images.ndim == 4 and s.images.shape[1:] == (3, size, size)
    assert s.images.is_contiguous()
    assert s.labels.dtype == torch.int64 and s.labels.shape == (len(s),)
    assert len(s.classes) == n_classes
    low = -1 if unlabelled else 0
    assert int(s.labels.min()) >= low and int(s.labels.max()) < n_classes


def _rows(images: torch.Tensor) -> set[bytes]:
    return {img.numpy().tobytes() for img in images}


# ---------------------------------------------------------------------------------------------
# shapes


def test_shapes_default_sizes_types_and_speed() -> None:
    start = time.perf_counter()
    splits = load_data(DataSpec(name="shapes"), seed=0)
    elapsed = time.perf_counter() - start
    assert elapsed < 3.0, f"generating 7,000 shapes at 32 px took {elapsed:.2f} s"
    assert isinstance(splits, DataSplits)
    assert splits.pretrain is splits.train
    assert len(splits.train) == 5000 and len(splits.test) == 2000
    for s in (splits.train, splits.test):
        _check_set(s, 32, 10)
        assert s.classes == SHAPE_CLASSES
        counts = torch.bincount(s.labels, minlength=10)
        assert counts.min() == counts.max() == len(s) // 10  # balanced, every class present
    # Colour must not carry the class: the mean colour per class is about the same.
    means = torch.stack(
        [splits.train.images[splits.train.labels == c].float().mean((0, 2, 3)) for c in range(10)]
    )
    assert (means.max(0).values - means.min(0).values).max() < 20  # out of 255


def test_shapes_deterministic_per_seed_and_different_across_seeds() -> None:
    spec = DataSpec(name="shapes", train_limit=300, eval_limit=100)
    a, b, c = load_data(spec, seed=3), load_data(spec, seed=3), load_data(spec, seed=4)
    assert torch.equal(a.train.images, b.train.images)
    assert torch.equal(a.train.labels, b.train.labels)
    assert torch.equal(a.test.images, b.test.images)
    assert not torch.equal(a.train.images, c.train.images)
    assert not torch.equal(a.test.images, c.test.images)
    # Train and test are drawn independently: no image is shared.
    assert not _rows(a.train.images) & _rows(a.test.images)


def test_shapes_other_sizes_and_limits() -> None:
    splits = load_data(DataSpec(name="shapes", image_size=24, train_limit=123, eval_limit=45))
    assert len(splits.pretrain) == len(splits.train) == 123 and len(splits.test) == 45
    _check_set(splits.train, 24, 10)
    _check_set(splits.test, 24, 10)
    assert set(splits.train.labels.tolist()) == set(range(10))
    assert set(splits.test.labels.tolist()) == set(range(10))


def _spectrum(images: torch.Tensor) -> np.ndarray:
    # |FFT| per channel is a fixed, translation-invariant transform of the raw pixels.
    return torch.fft.rfft2(images.float() / 255).abs().flatten(1).numpy()


def test_shapes_labels_mean_something() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    splits = load_data(DataSpec(name="shapes", image_size=16, train_limit=1500, eval_limit=500))
    scaler = StandardScaler().fit(_spectrum(splits.train.images))
    x_train = scaler.transform(_spectrum(splits.train.images))
    x_test = scaler.transform(_spectrum(splits.test.images))
    y_train, y_test = splits.train.labels.numpy(), splits.test.labels.numpy()

    # One BLAS thread: on a shared 2-core box threaded BLAS made these fits 40x slower.
    with threadpool_limits(1):
        clf = LogisticRegression(max_iter=200).fit(x_train, y_train)
        accuracy = clf.score(x_test, y_test)
        # Control: the same probe on shuffled labels stays near chance, so the score above
        # comes from the labels, not from the probe.
        shuffled = np.random.default_rng(0).permutation(y_train)
        control = LogisticRegression(max_iter=200).fit(x_train, shuffled).score(x_test, y_test)
    assert accuracy > 0.5, f"linear probe on |FFT| of pixels: {accuracy:.3f} (chance 0.1)"
    assert control < 0.2, f"probe on shuffled labels scored {control:.3f}"


# ---------------------------------------------------------------------------------------------
# digits


def test_digits_loads_with_fixed_stratified_split() -> None:
    splits = load_data(DataSpec(name="digits", image_size=16), seed=0)
    assert splits.pretrain is splits.train
    assert len(splits.train) == 1300 and len(splits.test) == 497
    for s in (splits.train, splits.test):
        _check_set(s, 16, 10)
        assert set(s.labels.tolist()) == set(range(10))
        assert torch.equal(s.images[:, 0], s.images[:, 1])  # grey replicated to 3 channels
        assert torch.equal(s.images[:, 0], s.images[:, 2])
    assert splits.train.classes == tuple(str(i) for i in range(10))
    # Stratified: every class has its share (about 72%) in the training split.
    share = torch.bincount(splits.train.labels) / (
        torch.bincount(splits.train.labels) + torch.bincount(splits.test.labels)
    )
    assert share.min() > 0.68 and share.max() < 0.76
    again = load_data(DataSpec(name="digits", image_size=16), seed=0)
    other = load_data(DataSpec(name="digits", image_size=16), seed=1)
    assert torch.equal(splits.test.images, again.test.images)
    assert not torch.equal(splits.test.labels, other.test.labels)


def test_limits_are_stratified_seeded_subsets() -> None:
    full = load_data(DataSpec(name="digits", image_size=8), seed=0)
    spec = DataSpec(name="digits", image_size=8, train_limit=100, eval_limit=50)
    small = load_data(spec, seed=0)
    assert len(small.pretrain) == len(small.train) == 100 and len(small.test) == 50
    assert torch.bincount(small.train.labels, minlength=10).min() >= 9
    assert torch.bincount(small.test.labels, minlength=10).min() >= 4
    assert _rows(small.train.images) <= _rows(full.train.images)
    assert _rows(small.test.images) <= _rows(full.test.images)
    assert torch.equal(small.train.images, load_data(spec, seed=0).train.images)
    assert not torch.equal(small.train.images, load_data(spec, seed=1).train.images)
    # A limit above the split size is no limit.
    big = load_data(DataSpec(name="digits", image_size=8, train_limit=10_000), seed=0)
    assert torch.equal(big.train.images, full.train.images)


# ---------------------------------------------------------------------------------------------
# imagefolder

COLOURS = {"blue": (20, 40, 230), "red": (230, 30, 20)}


def _write_images(folder: Path, n: int, size: tuple[int, int] = (20, 12), fmt: str = "JPEG"):
    """Per class, ``n`` images of the class's colour with slight variation (so none are equal)."""
    for name, rgb in COLOURS.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            colour = tuple(min(255, c + 3 * i) for c in rgb)
            ext = "jpg" if fmt == "JPEG" else fmt.lower()
            Image.new("RGB", size, colour).save(folder / name / f"{i:03d}.{ext}", fmt)


def _check_colours(s: ImageSet) -> None:
    red = s.images[:, 0].float().mean((1, 2))
    blue = s.images[:, 2].float().mean((1, 2))
    is_red = torch.tensor([s.classes[i] == "red" for i in s.labels.tolist()])
    assert torch.equal(red > blue, is_red)


def test_imagefolder_without_splits_is_split_80_20(tmp_path: Path) -> None:
    _write_images(tmp_path / "imgs", 10)
    spec = DataSpec(
        name="imagefolder", path=str(tmp_path / "imgs"), root=str(tmp_path / "r"), image_size=16
    )
    splits = load_data(spec, seed=0)
    assert splits.pretrain is splits.train
    assert len(splits.train) == 16 and len(splits.test) == 4
    for s in (splits.train, splits.test):
        _check_set(s, 16, 2)
        assert s.classes == ("blue", "red")
        assert torch.bincount(s.labels).tolist() == [len(s) // 2] * 2
        _check_colours(s)
    assert not _rows(splits.train.images) & _rows(splits.test.images)
    other = load_data(spec, seed=1)
    assert _rows(other.test.images) != _rows(splits.test.images)


def test_imagefolder_with_train_and_val(tmp_path: Path) -> None:
    _write_images(tmp_path / "train", 6, fmt="PNG")
    _write_images(tmp_path / "val", 3)
    spec = DataSpec(
        name="imagefolder",
        path=str(tmp_path),
        root=str(tmp_path / "r"),
        image_size=8,
        train_limit=4,
    )
    splits = load_data(spec)
    assert len(splits.pretrain) == len(splits.train) == 4 and len(splits.test) == 6
    assert torch.bincount(splits.train.labels).tolist() == [2, 2]
    _check_colours(splits.train)
    _check_colours(splits.test)


def test_imagefolder_prefers_test_over_val(tmp_path: Path) -> None:
    _write_images(tmp_path / "train", 4)
    _write_images(tmp_path / "val", 3)
    _write_images(tmp_path / "test", 2)
    splits = load_data(DataSpec(name="imagefolder", path=str(tmp_path), root=str(tmp_path)))
    assert len(splits.train) == 8 and len(splits.test) == 4


def test_imagefolder_resizes_shorter_side_then_center_crops(tmp_path: Path) -> None:
    # 48x16: black | white | black thirds. Shorter side to 16 then a center crop keeps the white.
    img = np.zeros((16, 48, 3), np.uint8)
    img[:, 16:32] = 255
    for name in ("a", "b"):
        (tmp_path / "f" / name).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(img).save(tmp_path / "f" / name / f"{i}.png")
    out = decode_files([tmp_path / "f" / "a" / "0.png"], 16)
    assert out.shape == (1, 3, 16, 16) and out.min() == 255
    # Downscaling is antialiased: a fine checkerboard averages to grey instead of aliasing.
    checker = ((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)
    Image.fromarray(checker).convert("RGB").save(tmp_path / "checker.png")
    grey = decode_files([tmp_path / "checker.png"], 8).float()
    assert (grey - 127.5).abs().max() < 8


def test_imagefolder_cache_is_used_and_invalidated(tmp_path: Path) -> None:
    _write_images(tmp_path / "imgs", 5)
    spec = DataSpec(
        name="imagefolder", path=str(tmp_path / "imgs"), root=str(tmp_path / "r"), image_size=8
    )
    first = load_data(spec)
    cached = list((tmp_path / "r" / ".cache").glob("*.pt"))
    assert len(cached) == 1
    assert torch.equal(load_data(spec).train.images, first.train.images)
    # A limited run from the cache equals a limited run that decodes files.
    limited = spec.model_copy(update={"train_limit": 3})
    from_cache = load_data(limited)
    decoded = load_data(limited.model_copy(update={"root": str(tmp_path / "fresh")}))
    assert torch.equal(from_cache.train.images, decoded.train.images)
    assert not (tmp_path / "fresh" / ".cache").exists()  # partial decodes are not cached
    # Replacing a file invalidates the cache.
    Image.new("RGB", (20, 12), (0, 255, 0)).save(tmp_path / "imgs" / "red" / "000.jpg")
    changed = load_data(spec)
    green = changed.train.images[:, 1].float().mean((1, 2)) > 200
    green |= changed.test.images[:, 1].float().mean((1, 2)).max() > 200
    assert bool(green.any())


def test_imagefolder_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=f"{missing}.*does not exist"):
        load_data(DataSpec(name="imagefolder", path=str(missing)))
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        load_data(DataSpec(name="imagefolder", path=str(tmp_path / "empty")))
    _write_images(tmp_path / "odd" / "train", 2)
    _write_images(tmp_path / "odd" / "val", 1)
    (tmp_path / "odd" / "val" / "green").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "odd" / "val" / "green" / "0.png")
    with pytest.raises(DataError, match="green"):
        load_data(DataSpec(name="imagefolder", path=str(tmp_path / "odd"), root=str(tmp_path)))
    (tmp_path / "bad" / "a").mkdir(parents=True)
    for i in range(5):
        (tmp_path / "bad" / "a" / f"{i}.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(DataError, match="cannot decode"):
        load_data(DataSpec(name="imagefolder", path=str(tmp_path / "bad"), root=str(tmp_path)))


# ---------------------------------------------------------------------------------------------
# torchvision datasets


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "stl10"])
def test_missing_torchvision_dataset_says_how_to_download(name: str, tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_data(DataSpec(name=name, root=str(tmp_path)))
    message = str(info.value)
    assert name in message and str(tmp_path) in message and "data.download=true" in message
    assert "\n" not in message


def test_cifar10_from_torchvision_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.cifar as cifar

    # The real archive is 170 MB; tiny batches in its pickle format exercise the same code.
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = {
            "data": rng.integers(0, 256, (20, 3072), dtype=np.uint8),
            "labels": [i % 10 for i in range(20)],
        }
        (folder / name).write_bytes(pickle.dumps(batches[name]))
    names = list(CIFAR10_CLASSES)
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))

    splits = load_data(DataSpec(name="cifar10", root=str(tmp_path)))
    assert splits.pretrain is splits.train
    assert len(splits.train) == 100 and len(splits.test) == 20
    _check_set(splits.train, 32, 10)
    assert splits.train.classes == tuple(names)
    expected = torch.from_numpy(batches["test_batch"]["data"]).reshape(20, 3, 32, 32)
    assert torch.equal(splits.test.images, expected)

    small = load_data(DataSpec(name="cifar10", root=str(tmp_path), image_size=16, eval_limit=10))
    _check_set(small.test, 16, 10)
    assert len(small.test) == 10 and set(small.test.labels.tolist()) == set(range(10))


def test_stl10_from_binary_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.datasets import STL10

    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("test", 10), ("unlabeled", 30)):
        rng.integers(0, 256, n * 3 * 96 * 96, dtype=np.uint8).tofile(folder / f"{split}_X.bin")
        if split != "unlabeled":
            (np.arange(n) % 10 + 1).astype(np.uint8).tofile(folder / f"{split}_y.bin")

    splits = load_data(DataSpec(name="stl10", root=str(tmp_path), image_size=96))
    monkeypatch.setattr(STL10, "_check_integrity", lambda self: True)
    reference = STL10(str(tmp_path), split="train+unlabeled")
    assert torch.equal(splits.pretrain.images, torch.from_numpy(reference.data))
    assert torch.equal(splits.pretrain.labels, torch.from_numpy(reference.labels).long())
    test_ref = STL10(str(tmp_path), split="test")
    assert torch.equal(splits.test.images, torch.from_numpy(test_ref.data))
    assert len(splits.train) == 20 and splits.train.labels.min() == 0
    _check_set(splits.pretrain, 96, 10, unlabelled=True)

    small = load_data(DataSpec(name="stl10", root=str(tmp_path), image_size=32, train_limit=10))
    assert len(small.pretrain) == len(small.train) == 10
    _check_set(small.pretrain, 32, 10, unlabelled=True)
    assert (small.pretrain.labels == -1).any() and (small.pretrain.labels >= 0).any()


# ---------------------------------------------------------------------------------------------
# real CIFAR-10 in ImageFolder form


@pytest.mark.skipif(
    not CIFAR.exists(),
    reason="real CIFAR-10 not present at ../shared/data/cifar10 (only on project machines)",
)
def test_cifar10_imagefolder(tmp_path: Path) -> None:
    spec = DataSpec(
        name="imagefolder", path=str(CIFAR), root=str(tmp_path), train_limit=2000, eval_limit=1000
    )
    splits = load_data(spec)
    assert len(splits.pretrain) == len(splits.train) == 2000 and len(splits.test) == 1000
    classes = CIFAR10_CLASSES
    for s in (splits.train, splits.test):
        _check_set(s, 32, 10)
        assert s.classes == classes
        assert torch.bincount(s.labels).tolist() == [len(s) // 10] * 10
    # The README's test-set mean RGB is (0.4941, 0.4851, 0.4504); a 1,000 image sample is near.
    mean = splits.test.images.float().mean((0, 2, 3)) / 255
    assert torch.allclose(mean, torch.tensor([0.4941, 0.4851, 0.4504]), atol=0.03)
    # The batched decoder agrees with PIL pixel for pixel on these files.
    files = sorted((CIFAR / "test" / "cat").glob("*.jpg"))[:8]
    pil = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    assert torch.equal(decode_files(files, 32), torch.from_numpy(pil).permute(0, 3, 1, 2))


def test_jpeg_decoder_failure_falls_back_to_pil(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.io

    rng = np.random.default_rng(0)
    files = []
    for i in range(3):
        files.append(tmp_path / f"{i}.jpg")
        Image.fromarray(rng.integers(0, 256, (24, 30, 3), dtype=np.uint8)).save(files[-1])
    fast = decode_files(files, 16)

    calls = []

    def broken(*args: object, **kwargs: object) -> None:
        calls.append(args)
        raise RuntimeError("unsupported JPEG")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", broken)
    assert torch.equal(decode_files(files, 16), fast)
    assert calls  # the batched decoder was tried, failed, and PIL produced the same pixels
