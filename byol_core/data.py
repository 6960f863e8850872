"""Datasets decoded once and held in memory as uint8 tensors.

Every dataset ends up as ``(N, 3, S, S)`` uint8 images (S = ``DataSpec.image_size``) plus int64
labels, so augmentation and evaluation never touch the file system during training. Loading is
deterministic given ``(spec, seed)``: the generated ``shapes`` set, the fixed train/test splits
and the ``train_limit`` / ``eval_limit`` subsets all derive from the seed alone.

A full decode of an ImageFolder (and a resized CIFAR) is cached under ``<spec.root>/.cache/``
as a ``.pt`` file of the uint8 tensors, keyed by (name, path, image_size); an ImageFolder's
cache also records a fingerprint of its file listing (names, sizes, mtimes), so an edited folder
is decoded again. Runs with limits decode only the files they keep but still read a full cache.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from byol_core.errors import ByolError
from byol_core.runtime import map_on_threads, single_threaded
from byol_core.spec import DataSpec

__all__ = [
    "SHAPE_CLASSES",
    "DataError",
    "DataSplits",
    "ImageSet",
    "decode_files",
    "generate_shapes",
    "load_data",
]

SHAPE_CLASSES: tuple[str, ...] = (
    "disc",
    "ring",
    "square",
    "frame",
    "triangle",
    "cross",
    "horizontal_bars",
    "vertical_bars",
    "checker",
    "diagonal_stripe",
)
SHAPES_TRAIN = 5000
SHAPES_TEST = 2000
DIGITS_TEST = 497
HOLDOUT_FRACTION = 0.2

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_CACHE_VERSION = 1
# Small enough that a chunk of large photos stays in the low hundreds of MB per thread, large
# enough that the per-call overhead of batched JPEG decoding is amortised on tiny images.
_DECODE_CHUNK = 256


class DataError(ByolError, RuntimeError):
    """A dataset cannot be loaded; the message says what is missing and what to do."""


@dataclass(frozen=True)
class ImageSet:
    """Images held in memory.

    Attributes:
        images: uint8 ``(N, 3, S, S)``, contiguous.
        labels: int64 ``(N,)``; ``-1`` marks an unlabelled image.
        classes: class names; label ``i`` is ``classes[i]``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(
                f"images must be uint8 (N, 3, S, S), got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(
                f"labels must be int64 ({self.images.shape[0]},), got "
                f"{self.labels.dtype} {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, index: torch.Tensor) -> ImageSet:
        """The images at ``index`` (a new, contiguous set)."""
        return ImageSet(self.images[index].contiguous(), self.labels[index].clone(), self.classes)


@dataclass(frozen=True)
class DataSplits:
    """The three views a training run needs.

    Attributes:
        pretrain: images for self-supervised training (labels may be -1).
        train: labelled training split (the 'standard' linear-evaluation protocol fits on it).
        test: labelled evaluation split.
    """

    pretrain: ImageSet
    train: ImageSet
    test: ImageSet


def load_data(spec: DataSpec, seed: int = 0) -> DataSplits:
    """Load (or generate) the dataset ``spec`` describes, applying its limits.

    ``train_limit`` caps ``pretrain`` and ``train``; ``eval_limit`` caps ``test``. Both pick a
    seeded, class-proportional subset. Raises :class:`DataError` when files are missing.
    """
    loaders: dict[str, Callable[[DataSpec, int], DataSplits]] = {
        "shapes": _load_shapes,
        "digits": _load_digits,
        "cifar10": _load_cifar,
        "cifar100": _load_cifar,
        "stl10": _load_stl10,
        "imagefolder": _load_imagefolder,
    }
    return loaders[spec.name](spec, seed)


# ---------------------------------------------------------------------------------------------
# Seeded selection helpers


def _generator(seed: int, *salt: object) -> torch.Generator:
    # Hashing lets any Python int (negative, huge) seed independent streams per purpose, so e.g.
    # the test subset does not change when train_limit does.
    digest = hashlib.sha256(repr((seed, *salt)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _proportional_order(labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random order of all indices whose every prefix is (nearly) class-proportional."""
    n = labels.numel()
    perm = torch.randperm(n, generator=gen)
    shuffled = labels[perm]
    by_class = torch.sort(shuffled, stable=True).indices
    sorted_labels = shuffled[by_class]
    _, counts = torch.unique_consecutive(sorted_labels, return_counts=True)
    starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    rank = torch.empty(n, dtype=torch.float64)
    rank[by_class] = (torch.arange(n) - starts).double()
    size = torch.empty(n, dtype=torch.float64)
    size[by_class] = torch.repeat_interleave(counts, counts).double()
    # Item k of a class of size c sits at (k + 0.5) / c in [0, 1]; taking the smallest keys
    # takes the same fraction of every class. The stable sort breaks ties by the random perm.
    key = (rank + 0.5) / size
    return perm[torch.sort(key, stable=True).indices]


def _limit(labels: torch.Tensor, limit: int | None, seed: int, salt: str) -> torch.Tensor | None:
    """Sorted indices of a seeded class-proportional subset, or None when no cut is needed."""
    if limit is None or limit >= labels.numel():
        return None
    order = _proportional_order(labels, _generator(seed, "limit", salt))
    return torch.sort(order[:limit]).values


def _split(
    labels: torch.Tensor, n_test: int, seed: int, salt: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded stratified (train, test) split of ``range(len(labels))``, both sorted."""
    order = _proportional_order(labels, _generator(seed, "split", salt))
    return torch.sort(order[n_test:]).values, torch.sort(order[:n_test]).values


def _apply_limits(
    pretrain: ImageSet, train: ImageSet, test: ImageSet, spec: DataSpec, seed: int
) -> DataSplits:
    def cut(s: ImageSet, limit: int | None, salt: str) -> ImageSet:
        index = _limit(s.labels, limit, seed, salt)
        return s if index is None else s.subset(index)

    same = pretrain is train
    train = cut(train, spec.train_limit, "train")
    pretrain = train if same else cut(pretrain, spec.train_limit, "pretrain")
    return DataSplits(pretrain, train, cut(test, spec.eval_limit, "test"))


# ---------------------------------------------------------------------------------------------
# Resizing


def _resize_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize uint8 ``(N, 3, h, w)`` so the shorter side is ``size``, then center-crop square."""
    h, w = images.shape[-2:]
    if h == size and w == size:
        return images
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        images = F.interpolate(
            images, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False
        )
    top, left = (nh - size) // 2, (nw - size) // 2
    return images[..., top : top + size, left : left + size]


def _resize_all(images: torch.Tensor, size: int, chunk: int = 2048) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images.contiguous()
    out = torch.empty((images.shape[0], 3, size, size), dtype=torch.uint8)
    for lo in range(0, images.shape[0], chunk):
        out[lo : lo + chunk] = _resize_batch(images[lo : lo + chunk], size)
    return out


# ---------------------------------------------------------------------------------------------
# Cache


def _cache_file(spec: DataSpec, *key: object) -> Path:
    digest = hashlib.sha256(repr((_CACHE_VERSION, spec.name, spec.image_size, *key)).encode())
    name = f"{spec.name}-{spec.image_size}px-{digest.hexdigest()[:16]}.pt"
    return Path(spec.root) / ".cache" / name


def _cache_load(path: Path) -> dict[str, torch.Tensor] | None:
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file is just a cache miss
        warnings.warn(f"ignoring unreadable data cache {path}: {exc}", stacklevel=3)
        return None
    return blob if isinstance(blob, dict) else None


def _cache_save(path: Path, blob: dict[str, torch.Tensor]) -> None:
    # Write then rename so a concurrent reader (another worker) never sees a partial file; a
    # read-only root only costs the speed-up, never the run.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(blob, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        warnings.warn(f"could not write data cache {path}: {exc}", stacklevel=3)
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# shapes


def _load_shapes(spec: DataSpec, seed: int) -> DataSplits:
    n_train = min(SHAPES_TRAIN, spec.train_limit or SHAPES_TRAIN)
    n_test = min(SHAPES_TEST, spec.eval_limit or SHAPES_TEST)
    # Drawing is a long chain of ~1 ms element-wise ops. On a busy machine (other trainings on
    # the same cores) OpenMP threads wait on each other at every op: measured 0.5 s on one
    # thread against 3-10 s on two for the default 7,000 images, and never slower single.
    with single_threaded():
        train = generate_shapes(n_train, spec.image_size, _generator(seed, "shapes", "train"))
        test = generate_shapes(n_test, spec.image_size, _generator(seed, "shapes", "test"))
    return DataSplits(train, train, test)


def generate_shapes(n: int, size: int, gen: torch.Generator) -> ImageSet:
    """Draw ``n`` images of the 10 :data:`SHAPE_CLASSES`, classes balanced and shuffled.

    Shapes are signed distance fields in a per-image frame (random centre, scale, rotation)
    rasterised with one pixel of anti-aliasing; foreground and background colours are random
    and independent of the class, so only shape tells classes apart.
    """
    k = len(SHAPE_CLASSES)
    labels = (torch.arange(n) % k)[torch.randperm(n, generator=gen)]
    scale = 0.45 + 0.3 * torch.rand(n, generator=gen)
    centre = (torch.rand(n, 2, generator=gen) * 2 - 1) * (0.95 - scale)[:, None]
    # Bars, checker and diagonal stripe are defined by their orientation, so they only wobble;
    # the other shapes may turn freely.
    free = torch.isin(labels, torch.tensor([2, 3, 4, 5]))
    angle = torch.where(
        free,
        torch.rand(n, generator=gen) * 2 * math.pi,
        (torch.rand(n, generator=gen) - 0.5) * math.radians(30),
    )
    flip = torch.randint(0, 2, (n,), generator=gen) * 2 - 1  # which diagonal
    bg = torch.rand(n, 3, generator=gen)
    fg = torch.rand(n, 3, generator=gen)
    # Colours too close would make the shape invisible; the shifted hue is far in every channel.
    fg = torch.where(((fg - bg).norm(dim=1) < 0.45)[:, None], (bg + 0.5) % 1.0, fg)

    axis = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    gy, gx = torch.meshgrid(axis, axis, indexing="ij")
    images = torch.empty((n, 3, size, size), dtype=torch.uint8)
    chunk = max(1, (1 << 20) // (size * size))
    for lo in range(0, n, chunk):
        sl = slice(lo, min(n, lo + chunk))
        x = gx - centre[sl, 0, None, None]
        y = gy - centre[sl, 1, None, None]
        c, s = torch.cos(angle[sl])[:, None, None], torch.sin(angle[sl])[:, None, None]
        r = scale[sl, None, None]
        u, v = (c * x + s * y) / r, (c * y - s * x) / r
        dist = torch.empty_like(u)
        lab = labels[sl]
        for cls in range(k):
            m = lab == cls
            if m.any():
                dist[m] = _shape_sdf(cls, u[m], v[m], flip[sl][m, None, None].float())
        # Distances are in frame units; one frame unit spans r * size / 2 pixels.
        alpha = (0.5 - dist * r * (size / 2)).clamp(0, 1)[:, None]
        img = bg[sl, :, None, None] * (1 - alpha) + fg[sl, :, None, None] * alpha
        img += 0.04 * torch.randn(img.shape, generator=gen)
        images[sl] = (img * 255).round().clamp(0, 255).to(torch.uint8)
    return ImageSet(images, labels.to(torch.int64), SHAPE_CLASSES)


def _bars(across: torch.Tensor, along: torch.Tensor) -> torch.Tensor:
    """Three equal bars of width 0.3 centred at 0 and +-0.6 on the ``across`` axis."""
    omega = 2 * math.pi / 0.6
    outline = torch.maximum(along.abs() - 0.9, across.abs() - 0.75)
    return torch.maximum(outline, -torch.cos(across * omega) / omega)


def _shape_sdf(cls: int, u: torch.Tensor, v: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Approximate signed distance (negative inside) of shape ``cls`` in frame units."""
    au, av = u.abs(), v.abs()
    box = torch.maximum(au, av)
    radius = torch.sqrt(u * u + v * v)
    omega = 2 * math.pi
    if cls == 0:  # disc
        return radius - 1.0
    if cls == 1:  # ring
        return (radius - 0.75).abs() - 0.25
    if cls == 2:  # square
        return box - 0.8
    if cls == 3:  # frame
        return (box - 0.68).abs() - 0.2
    if cls == 4:  # triangle: three half-planes of an equilateral triangle in the unit circle
        edges = [
            u * math.cos(a) + v * math.sin(a)
            for a in (math.pi / 2 + 2 * math.pi * i / 3 for i in range(3))
        ]
        return torch.stack(edges).amax(0) - 0.5
    if cls == 5:  # cross
        return torch.minimum(torch.maximum(au - 0.28, av - 0.9), torch.maximum(av - 0.28, au - 0.9))
    if cls == 6:  # horizontal bars
        return _bars(v, u)
    if cls == 7:  # vertical bars
        return _bars(u, v)
    if cls == 8:  # checker
        return torch.maximum(box - 0.9, -torch.sin(u * omega) * torch.sin(v * omega) / omega)
    if cls == 9:  # one thick band along a diagonal
        return torch.maximum(box - 0.9, (u - flip * v).abs() / math.sqrt(2) - 0.3)
    raise ValueError(f"unknown shape class {cls}")


# ---------------------------------------------------------------------------------------------
# digits


def _load_digits(spec: DataSpec, seed: int) -> DataSplits:
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = torch.from_numpy(digits.images).float()[:, None] * (255.0 / 16.0)
    # Upscale in float: the 8x8 source has only 17 levels, rounding before resizing would band.
    big = F.interpolate(
        grey,
        size=(spec.image_size,) * 2,
        mode="bilinear",
        align_corners=False,
        antialias=spec.image_size < 8,
    )
    images = big.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(digits.target).to(torch.int64)
    everything = ImageSet(images, labels, tuple(str(c) for c in digits.target_names))
    train_idx, test_idx = _split(labels, DIGITS_TEST, seed, "digits")
    train = everything.subset(train_idx)
    return _apply_limits(train, train, everything.subset(test_idx), spec, seed)


# ---------------------------------------------------------------------------------------------
# torchvision datasets


def _missing(spec: DataSpec, exc: BaseException) -> DataError:
    root = Path(spec.root).resolve()
    if spec.download:
        return DataError(f"could not download or read {spec.name} under {root}: {exc}")
    return DataError(
        f"{spec.name} not found under data.root={root}; pass data.download=true "
        f"(or --set data.download=true) to download it, or point data.root at a copy"
    )


def _torchvision(spec: DataSpec, factory: Callable[..., object], **kwargs: object) -> object:
    try:
        return factory(root=spec.root, download=spec.download, **kwargs)
    except (RuntimeError, OSError) as exc:
        raise _missing(spec, exc) from exc


def _load_cifar(spec: DataSpec, seed: int) -> DataSplits:
    from torchvision.datasets import CIFAR10, CIFAR100

    factory = CIFAR10 if spec.name == "cifar10" else CIFAR100
    sets = []
    for train in (True, False):
        ds = _torchvision(spec, factory, train=train)
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2)  # type: ignore[attr-defined]
        labels = torch.as_tensor(ds.targets, dtype=torch.int64)  # type: ignore[attr-defined]
        images = _cached_resize(spec, images, "train" if train else "test")
        sets.append(ImageSet(images, labels, tuple(ds.classes)))  # type: ignore[attr-defined]
    return _apply_limits(sets[0], sets[0], sets[1], spec, seed)


def _cached_resize(spec: DataSpec, images: torch.Tensor, split: str) -> torch.Tensor:
    if images.shape[-1] == spec.image_size and images.shape[-2] == spec.image_size:
        return images.contiguous()
    path = _cache_file(spec, str(Path(spec.root).resolve()), split, tuple(images.shape))
    blob = _cache_load(path)
    if blob is not None and blob.get("images") is not None:
        return blob["images"]
    resized = _resize_all(images, spec.image_size)
    _cache_save(path, {"images": resized})
    return resized


STL10_CLASSES = (
    "airplane",
    "bird",
    "car",
    "cat",
    "deer",
    "dog",
    "horse",
    "monkey",
    "ship",
    "truck",
)
_STL10_RECORD = 3 * 96 * 96


def _load_stl10(spec: DataSpec, seed: int) -> DataSplits:
    """STL-10 from its binary files, read through memory maps.

    torchvision's STL10 checks the MD5 of all 3 GB on every construction and loads every split
    whole; here it is only used to download. The files are then read directly, so a
    ``train_limit`` only touches the unlabelled rows it keeps.
    """
    from torchvision.datasets import STL10

    folder = Path(spec.root) / STL10.base_folder
    if spec.download:
        _torchvision(spec, STL10, split="test")
    names = ("train_X.bin", "train_y.bin", "unlabeled_X.bin", "test_X.bin", "test_y.bin")
    if not all((folder / n).is_file() for n in names):
        raise _missing(spec, FileNotFoundError(folder))
    class_file = folder / STL10.class_names_file
    classes = tuple(class_file.read_text().splitlines()) if class_file.is_file() else STL10_CLASSES

    def read(
        split: str, rows: np.ndarray | None = None, out: torch.Tensor | None = None
    ) -> ImageSet:
        raw = np.memmap(folder / f"{split}_X.bin", dtype=np.uint8, mode="r")
        if raw.size % _STL10_RECORD:
            raise DataError(
                f"{folder / f'{split}_X.bin'} is truncated; delete it and download again"
            )
        raw = raw.reshape(-1, 3, 96, 96)
        if split == "unlabeled":
            labels = torch.full((raw.shape[0],), -1, dtype=torch.int64)
        else:
            labels = torch.from_numpy(np.fromfile(folder / f"{split}_y.bin", dtype=np.uint8))
            if labels.numel() != raw.shape[0]:
                raise DataError(f"{split}_X.bin and {split}_y.bin in {folder} disagree in length")
            labels = labels.to(torch.int64) - 1  # the files count classes from 1
        rows = np.arange(raw.shape[0]) if rows is None else rows
        if out is None:
            out = torch.empty((rows.size, 3, spec.image_size, spec.image_size), dtype=torch.uint8)
        for lo in range(0, rows.size, 4096):
            chunk = torch.from_numpy(np.ascontiguousarray(raw[rows[lo : lo + 4096]]))
            # STL-10 stores images column-major (torchvision's loader transposes the same way).
            out[lo : lo + chunk.shape[0]] = _resize_all(chunk.transpose(2, 3), spec.image_size)
        return ImageSet(out, labels[torch.from_numpy(rows)], classes)

    train, test = read("train"), read("test")
    splits = _apply_limits(train, train, test, spec, seed)
    # pretrain is 'train+unlabeled' in torchvision's order, the labelled images first. At 96 px
    # the unlabelled part alone is 2.8 GB, so it is written straight into the final tensor.
    n_unlabeled = (folder / "unlabeled_X.bin").stat().st_size // _STL10_RECORD
    labels = torch.cat([train.labels, torch.full((n_unlabeled,), -1, dtype=torch.int64)])
    keep = _limit(labels, spec.train_limit, seed, "pretrain")
    if keep is None:
        keep = torch.arange(labels.numel())
    from_train = keep[keep < len(train)]
    images = torch.empty((keep.numel(), 3, spec.image_size, spec.image_size), dtype=torch.uint8)
    images[: from_train.numel()] = train.images[from_train]
    rows = (keep[keep >= len(train)] - len(train)).numpy()
    read("unlabeled", rows, images[from_train.numel() :])
    pretrain = ImageSet(images, labels[keep], classes)
    return DataSplits(pretrain, splits.train, splits.test)


# ---------------------------------------------------------------------------------------------
# imagefolder


@dataclass(frozen=True)
class _Folder:
    root: Path
    files: tuple[str, ...]  # paths relative to root
    labels: torch.Tensor

    def path(self, i: int) -> str:
        # Plain strings: pathlib costs seconds over the 60,000 files of a CIFAR-sized folder.
        return os.path.join(self.root, self.files[i])

    def fingerprint(self) -> str:
        """A digest of names, sizes and modification times: what invalidates a cache."""
        h = hashlib.sha256()
        for i, rel in enumerate(self.files):
            st = os.stat(self.path(i))
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()


def _class_dirs(root: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def _scan(root: Path, classes: Sequence[str], strict: bool) -> _Folder:
    index = {c: i for i, c in enumerate(classes)}
    files: list[str] = []
    labels: list[int] = []
    for name in _class_dirs(root):
        if name not in index:
            if strict:
                raise DataError(
                    f"class folder {root / name} has no counterpart in the training "
                    f"split; evaluation classes must be a subset of training classes"
                )
            continue
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames.sort()
            prefix = os.path.relpath(dirpath, root)
            for f in sorted(filenames):
                if f.lower().endswith(IMG_EXTENSIONS):
                    files.append(os.path.join(prefix, f))
                    labels.append(index[name])
    return _Folder(root, tuple(files), torch.tensor(labels, dtype=torch.int64))


def _load_imagefolder(spec: DataSpec, seed: int) -> DataSplits:
    """An ImageFolder tree: ``path/<class>/**/<image>``, or ``path/train/<class>/...``.

    With a ``train`` subfolder, it is both pretrain and train, and ``test`` (else ``val``) is the
    evaluation split; with neither, ``train`` is split like a bare folder: stratified 80/20 by
    the seed. Evaluation class folders must also exist in the training split.
    """
    assert spec.path is not None  # DataSpec's validator guarantees it
    root = Path(spec.path).expanduser()
    if not root.is_dir():
        raise DataError(
            f"imagefolder path {root.resolve()} does not exist or is not a folder; "
            f"set data.path to a folder of class subfolders (optionally under train/)"
        )
    eval_dir = None
    if (root / "train").is_dir():
        train_dir = root / "train"
        eval_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    else:
        train_dir = root
    classes = _class_dirs(train_dir)
    train_folder = _scan(train_dir, classes, strict=False)
    if not train_folder.files:
        raise DataError(
            f"no images ({', '.join(IMG_EXTENSIONS)}) found in class subfolders of "
            f"{train_dir.resolve()}"
        )
    # Drop class folders without a single image so every label index is used.
    used = sorted(set(train_folder.labels.tolist()))
    if len(used) != len(classes):
        classes = [classes[i] for i in used]
        train_folder = _scan(train_dir, classes, strict=False)

    if eval_dir is not None:
        eval_folder = _scan(eval_dir, classes, strict=True)
        if not eval_folder.files:
            raise DataError(f"no images found in class subfolders of {eval_dir.resolve()}")
        train_idx = torch.arange(len(train_folder.files))
        test_idx = torch.arange(len(eval_folder.files))
    else:
        n_test = round(HOLDOUT_FRACTION * len(train_folder.files))
        if not 0 < n_test < len(train_folder.files):
            raise DataError(
                f"{train_dir.resolve()} has {len(train_folder.files)} image(s), too few to hold "
                f"out {HOLDOUT_FRACTION:.0%} for evaluation; add images or a test/ folder"
            )
        train_idx, test_idx = _split(train_folder.labels, n_test, seed, "imagefolder")
        eval_folder = train_folder

    cut = _limit(train_folder.labels[train_idx], spec.train_limit, seed, "train")
    train_idx = train_idx if cut is None else train_idx[cut]
    cut = _limit(eval_folder.labels[test_idx], spec.eval_limit, seed, "test")
    test_idx = test_idx if cut is None else test_idx[cut]

    names = tuple(classes)
    if eval_folder is train_folder:
        both = _decode_folder(spec, train_folder, torch.cat([train_idx, test_idx]))
        images_train, images_test = both[: train_idx.numel()], both[train_idx.numel() :]
    else:
        images_train = _decode_folder(spec, train_folder, train_idx)
        images_test = _decode_folder(spec, eval_folder, test_idx)
    train = ImageSet(images_train.contiguous(), train_folder.labels[train_idx], names)
    test = ImageSet(images_test.contiguous(), eval_folder.labels[test_idx], names)
    return DataSplits(train, train, test)


def _decode_folder(spec: DataSpec, folder: _Folder, index: torch.Tensor) -> torch.Tensor:
    """Images ``index`` of ``folder``, from the cache when a full decode of it is cached.

    Only a decode of the whole folder is cached, so a limited run never leaves a partial cache
    behind, yet still profits from one a full run wrote.
    """
    path = _cache_file(spec, str(folder.root.resolve()))
    fingerprint = folder.fingerprint()
    blob = _cache_load(path)
    if blob is not None:
        cached = blob.get("images")
        stamp = blob.get("fingerprint")
        if (
            isinstance(cached, torch.Tensor)
            and isinstance(stamp, str)
            and stamp == fingerprint
            and cached.shape[0] == len(folder.files)
        ):
            return cached[index]
    unique, inverse = torch.unique(index, return_inverse=True)
    if unique.numel() == len(folder.files):
        images = decode_files([folder.path(i) for i in range(len(folder.files))], spec.image_size)
        _cache_save(path, {"images": images, "fingerprint": fingerprint})
        return images[index]
    images = decode_files([folder.path(i) for i in unique.tolist()], spec.image_size)
    return images[inverse]


def decode_files(
    paths: Sequence[str | Path], size: int, workers: int | None = None
) -> torch.Tensor:
    """Decode image files to uint8 ``(N, 3, size, size)`` (shorter side resized, center crop).

    JPEGs go through libjpeg-turbo in batches (``torchvision.io.decode_jpeg``) on a thread pool,
    which releases the GIL; other formats, and any JPEG that fails there (CMYK, truncated, ...),
    fall back to PIL one by one.
    """
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    chunks = [
        range(lo, min(len(paths), lo + _DECODE_CHUNK)) for lo in range(0, len(paths), _DECODE_CHUNK)
    ]
    # torch's thread count honours OMP_NUM_THREADS / runtime.threads (and a Ray worker's CPU
    # share), which os.cpu_count() would overrun.
    workers = workers or max(1, min(8, torch.get_num_threads()))

    def run(chunk: range) -> None:
        _decode_chunk([paths[i] for i in chunk], size, out[chunk.start : chunk.stop])

    # The pool is the parallelism: intra-op threads on top only make the per-chunk resizes
    # contend for the same cores.
    with warnings.catch_warnings(), single_threaded():
        # torchvision 0.29 warns on every decode call that TorchCodec will replace it; the
        # project pins 0.29 and falls back to PIL should the decoder go away.
        warnings.filterwarnings("ignore", "The image decoding", DeprecationWarning)
        map_on_threads(run, chunks, workers)
    return out


def _decode_chunk(paths: Sequence[str | Path], size: int, out: torch.Tensor) -> None:
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:  # torchvision deprecates its decoders (0.29); PIL is always there
        decode_jpeg = None

    data = [_read_bytes(p) for p in paths]
    decoded: list[torch.Tensor | None] = [None] * len(paths)
    jpegs = [i for i, d in enumerate(data) if d[:3].tolist() == [0xFF, 0xD8, 0xFF]]
    if jpegs and decode_jpeg is not None:
        try:
            batch = decode_jpeg([data[i] for i in jpegs], mode=ImageReadMode.RGB)
        except RuntimeError:  # one bad file fails the batch; find it one by one below
            batch = [None] * len(jpegs)
        for i, img in zip(jpegs, batch, strict=True):
            decoded[i] = img
    for i, img in enumerate(decoded):
        if img is None:
            decoded[i] = _decode_pil(paths[i])
    # Same-sized images (the common case for a small dataset) are resized as one batch.
    groups: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(decoded):
        assert img is not None
        groups.setdefault((img.shape[1], img.shape[2]), []).append(i)
    for members in groups.values():
        if len(members) == 1:
            out[members[0]] = _resize_batch(decoded[members[0]][None], size)[0]  # type: ignore[index]
        else:
            stack = torch.stack([decoded[i] for i in members])  # type: ignore[misc]
            out[members] = _resize_batch(stack, size)


def _read_bytes(path: str | Path) -> torch.Tensor:
    with open(path, "rb") as fh:
        raw = fh.read()
    # frombuffer rejects empty buffers; an empty file then fails in PIL with a clear message.
    if not raw:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def _decode_pil(path: str | Path) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(f"cannot decode image {path}: {exc}") from exc
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)
