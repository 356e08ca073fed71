"""Folders of images: torchvision's ``ImageFolder`` layout, and folders of images alone.

::

    root/train/<class>/*.png|jpg|...     labelled: one folder per class (sorted names = labels)
    root/val/<class>/...   (or test/)
    root/*.jpg  (or any nesting)         unlabelled: images alone, for ranking and calibration

Any format Pillow reads. Images are decoded in ``DataLoader`` worker processes (``workers``),
resized for ``size`` and normalised there, so decoding is not the bottleneck of a fine-tune:
training batches get the standard augmentation (small images: resize, random crop with padding
``size // 8`` and a horizontal flip, as for CIFAR; larger ones: random-resized crop and a flip,
as for ImageNet), evaluation batches a resize and centre crop (ratio 0.875 above 64 pixels).

>>> import tempfile
>>> from PIL import Image
>>> root = Path(tempfile.mkdtemp())
>>> for split, cls, i in [("train", "cat", 0), ("train", "dog", 1), ("val", "cat", 2), ("val", "dog", 3)]:
...     (root / split / cls).mkdir(parents=True, exist_ok=True)
...     Image.new("RGB", (20, 12), (i * 60, 0, 0)).save(root / split / cls / f"{i}.png")
>>> data = load_image_folder(root, "train", size=16)
>>> data.describe().split(" from ")[0], data.classes, data.image_shape
('imagefolder train (2 images, 2 classes)', ('cat', 'dog'), (3, 16, 16))
>>> x, y = next(iter(data.loader(2, workers=0)))
>>> tuple(x.shape), y.tolist()
((2, 3, 16, 16), [0, 1])
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ehap_fx.data import IMAGENET_NORM, Normalization
from ehap_fx.errors import DataError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
TRAIN_SPLITS = ("train",)
TEST_SPLITS = ("val", "test")
SMALL = 64  # at or below this size: CIFAR-style augmentation, no centre-crop margin


def layout(root: str | Path) -> str | None:
    """``"imagefolder"`` (``train/`` and ``val/`` or ``test/`` of class folders), ``"images"``
    (image files with no such split) or None (no images: another layout, or nothing)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        return None
    if (root / "train").is_dir() and any((root / s).is_dir() for s in TEST_SPLITS):
        return "imagefolder"
    return "images" if next(_images(root), None) is not None else None


def _images(folder: Path):
    for dirpath, _, files in os.walk(folder, followlinks=True):
        for f in sorted(files):
            if f.lower().endswith(EXTENSIONS):
                yield Path(dirpath) / f


def _decode_default() -> int:
    """Worker processes for decoding: the cores but one, at most 8 (0: in the main process)."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


@dataclass(frozen=True, eq=False)
class ImageFolderData:
    """One split of an image folder: file paths and labels (``-1``: unlabelled), the class names,
    and the side ``size`` images are brought to (square)."""

    paths: tuple[Path, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]
    split: str
    root: Path
    size: int = 224
    name: str = "imagefolder"
    synthetic: bool = False

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"input size={self.size} must be >= 1")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def labelled(self) -> bool:
        return bool(self.classes)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.size, self.size)

    def describe(self) -> str:
        what = f"{self.num_classes} classes" if self.labelled else "unlabelled"
        return f"{self.name} {self.split} ({len(self)} images, {what}) from {self.root}"

    def head(self, n: int) -> ImageFolderData:
        """The first ``n`` images (all when ``n >= len``), taken across classes in turn so that
        a head of a sorted folder still holds every class."""
        if n < 1:
            raise ValueError(f"head n={n} must be >= 1")
        seen: dict[int, int] = {}
        ranks = []  # the position of each image within its class
        for label in self.labels:
            ranks.append(seen.get(label, 0))
            seen[label] = ranks[-1] + 1
        order = sorted(sorted(range(len(self)), key=lambda i: (ranks[i], self.labels[i]))[:n])
        return replace(self, paths=tuple(self.paths[i] for i in order),
                       labels=tuple(self.labels[i] for i in order))

    def resized(self, size: int) -> ImageFolderData:
        return replace(self, size=size)

    def loader(self, batch_size: int = 128, *, shuffle: bool = False, augment: bool = False, seed: int = 0,
               normalization: Normalization = IMAGENET_NORM, workers: int | None = None,
               drop_last: bool = False) -> torch.utils.data.DataLoader:
        """Batches of ``(x, y)`` (labelled) or ``x`` (unlabelled): x float32 normalised
        ``(B, 3, size, size)``, decoded in ``workers`` processes (default: the cores but one)."""
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        workers = _decode_default() if workers is None else workers
        dataset = _Decoded(self, augment, normalization)
        return torch.utils.data.DataLoader(
            dataset, batch_size, shuffle=shuffle, num_workers=workers, drop_last=drop_last,
            persistent_workers=workers > 0, generator=torch.Generator().manual_seed(seed))


class _Decoded(torch.utils.data.Dataset):
    """Image ``i`` decoded, transformed and normalised: ``(x, label)``, or ``x`` unlabelled."""

    def __init__(self, data: ImageFolderData, augment: bool, normalization: Normalization) -> None:
        self.data, self.transform = data, _transform(data.size, augment, normalization)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        from PIL import Image

        path = self.data.paths[i]
        try:
            with Image.open(path) as img:
                x = self.transform(img.convert("RGB"))  # (3, size, size)
        except Exception as e:  # truncated or foreign files: name the file
            raise DataError(f"{path}: not an image Pillow can read ({type(e).__name__}: {e})") from e
        return (x, self.data.labels[i]) if self.data.labelled else x


def _transform(size: int, augment: bool, norm: Normalization):
    try:
        from torchvision.transforms import v2
    except ImportError as e:
        raise DataError(f"image folders need torchvision and Pillow ({e}): pip install torchvision") from e
    if size <= SMALL:
        steps = [v2.Resize(size), v2.CenterCrop(size)]
        if augment:
            steps += [v2.RandomCrop(size, padding=max(1, size // 8)), v2.RandomHorizontalFlip()]
    elif augment:
        steps = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
    else:
        steps = [v2.Resize(round(size / 0.875), antialias=True), v2.CenterCrop(size)]
    return v2.Compose([v2.PILToTensor(), *steps, v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(list(norm.mean), list(norm.std))])


def load_image_folder(root: str | Path, split: str = "train", *, size: int = 224) -> ImageFolderData:
    """One split of an image folder at ``root``: ``"train"`` or ``"test"`` (``val/``, else
    ``test/``) of the ImageFolder layout, or every image of a folder of images alone
    (unlabelled; both splits are then that folder). Raises :class:`DataError` naming the layout
    expected and what was found."""
    root = Path(root).expanduser()
    kind = layout(root)
    if kind is None:
        raise DataError(f"{str(root)!r} holds no images: expected train/ and val/ (or test/) of class "
                        f"folders (torchvision's ImageFolder layout), or image files "
                        f"({', '.join(EXTENSIONS[:4])}, ...)")
    if kind == "images":
        paths = tuple(_images(root))
        return ImageFolderData(paths, (-1,) * len(paths), (), "all", root, size)
    if split not in ("train", "test"):
        raise DataError(f"unknown split={split!r}; known: train, test")
    tests = [root / s for s in TEST_SPLITS if (root / s).is_dir()]
    folder = root / "train" if split == "train" else tests[0]
    classes = tuple(sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")))
    if not classes:
        raise DataError(f"{folder}: no class folders (ImageFolder layout: {folder.name}/<class>/<image>)")
    paths, labels = [], []
    for label, cls in enumerate(classes):
        found = list(_images(folder / cls))
        paths += found
        labels += [label] * len(found)
    if not paths:
        raise DataError(f"{folder}: the class folders {', '.join(classes[:5])} hold no image files")
    return ImageFolderData(tuple(paths), tuple(labels), classes, folder.name, root, size)


def check_classes(train: ImageFolderData, test: ImageFolderData) -> None:
    """Train and test must name the same classes in the same order (the labels are indices)."""
    if train.labelled and test.labelled and train.classes != test.classes:
        only = sorted(set(train.classes) ^ set(test.classes))
        raise DataError(f"{train.root}: train/ and {test.split}/ have different class folders "
                        f"(in one only: {', '.join(only[:6]) or 'none; the order differs'})")
