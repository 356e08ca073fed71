"""CIFAR-10/100 in memory, with batched tensor augmentation.

The data are read straight from the official "python version" layout (the files the CIFAR
site ships and torchvision downloads) with :mod:`pickle`, so re-encoded or self-converted
copies load too (torchvision's class checks the md5 of the original archives and refuses them)::

    root/cifar-10-batches-py/  data_batch_1 .. data_batch_5, test_batch, batches.meta
    root/cifar-100-python/     train, test, meta          (labels: ``fine_labels``)

Images stay uint8 ``(N, 3, 32, 32)`` tensors; a :class:`CifarLoader` converts, augments
(random crop with 4-pixel zero padding + horizontal flip) and normalises whole batches on
tensors, with no PIL and no worker processes.

>>> data = synthetic_cifar(64, num_classes=10, seed=0)
>>> data.name, data.synthetic, tuple(data.images.shape), data.images.dtype
('synthetic (random) CIFAR-shaped data', True, (64, 3, 32, 32), torch.uint8)
>>> x, y = next(iter(data.loader(16, shuffle=True, augment=True, seed=1)))
>>> tuple(x.shape), x.dtype, tuple(y.shape), y.dtype
((16, 3, 32, 32), torch.float32, (16,), torch.int64)

Pickle files can run code when loaded: only point ``root`` at CIFAR files you trust.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ehap_fx.errors import DataError

SYNTHETIC_NAME = "synthetic (random) CIFAR-shaped data"
DIGITS_NAME = "digits"


@dataclass(frozen=True)
class Normalization:
    """Per-channel ``(x - mean) / std`` applied to RGB values in [0, 1]."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean={self.mean} and std={self.std} need 3 values (RGB)")
        if min(self.std) <= 0:
            raise ValueError(f"std={self.std} must be positive")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(N, 3, H, W)`` -> normalised float32 ``(N, 3, H, W)``."""
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (images.float().div_(255.0) - mean).div_(std)


# Statistics each pretrained source trained with (see shared/weights/README.md).
IMAGENET_NORM = Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # akamaster
CIFAR10_NORM = Normalization((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_NORM = Normalization((0.5070, 0.4865, 0.4409), (0.2673, 0.2564, 0.2761))  # chenyaofo
DIGITS_NORM = Normalization((0.3053,) * 3, (0.3189,) * 3)  # load_digits(), 16x16, all 1,797 images


@dataclass(frozen=True)
class _Layout:
    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    label_key: str
    names_key: str
    num_classes: int


LAYOUTS = {
    "cifar10": _Layout(
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "batches.meta",
        "labels",
        "label_names",
        10,
    ),
    "cifar100": _Layout(
        "cifar-100-python", ("train",), ("test",), "meta", "fine_labels", "fine_label_names", 100
    ),
}
SPLITS = ("train", "test")


@dataclass(frozen=True, eq=False)
class CifarData:
    """One split of a CIFAR-shaped dataset held in memory.

    ``images`` is uint8 ``(N, 3, 32, 32)`` RGB, ``labels`` int64 ``(N,)``. ``name`` is
    ``"cifar10"``, ``"cifar100"`` or :data:`SYNTHETIC_NAME`; ``synthetic`` says whether the
    data are random (always report it next to any figure measured on them).
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    name: str
    split: str
    synthetic: bool = False
    root: Path | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] != 3:
            raise DataError(f"images must be uint8 (N, 3, H, W), got "
                            f"{self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise DataError(f"{len(self.labels)} labels for {self.images.shape[0]} images")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def describe(self) -> str:
        """One line for logs and reports, e.g. ``cifar10 test (10000 images, 10 classes)``."""
        where = f" from {self.root}" if self.root is not None else ""
        return f"{self.name} {self.split} ({len(self)} images, {self.num_classes} classes){where}"

    def class_counts(self) -> torch.Tensor:
        """Number of images per class, int64 ``(num_classes,)``."""
        return torch.bincount(self.labels, minlength=self.num_classes)

    def head(self, n: int) -> CifarData:
        """The first ``n`` images (all of them when ``n >= len(self)``)."""
        if n < 1:
            raise ValueError(f"head n={n} must be >= 1")
        return CifarData(self.images[:n], self.labels[:n], self.classes, self.name,
                         self.split, self.synthetic, self.root)

    def loader(
        self,
        batch_size: int = 128,
        *,
        shuffle: bool = False,
        augment: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        limit: int | None = None,
        normalization: Normalization = CIFAR10_NORM,
    ) -> CifarLoader:
        """Batches of ``(x, y)``: x float32 normalised ``(B, 3, 32, 32)``, y int64 ``(B,)``.

        ``limit`` keeps the first ``limit`` images; ``shuffle`` reorders them every epoch
        and ``augment`` applies random crop (4-pixel zero padding) + horizontal flip, both
        drawn from a generator seeded with ``seed``: two loaders with the same arguments
        yield the same batches. Use the normalisation the model was trained with
        (:func:`ehap_fx.models.normalization`).
        """
        data = self if limit is None else self.head(limit)
        return CifarLoader(data, batch_size, shuffle, augment, seed, drop_last, normalization)


class CifarLoader:
    """Iterates over a :class:`CifarData` in batches; each ``iter()`` is one epoch."""

    def __init__(
        self,
        data: CifarData,
        batch_size: int,
        shuffle: bool,
        augment: bool,
        seed: int,
        drop_last: bool,
        normalization: Normalization,
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.rank, self.world_size = rank, world_size
        if drop_last and batch_size > self._local_size():
            raise DataError(
                f"drop_last with batch_size={batch_size} > {self._local_size()} images yields no "
                "batch; lower batch_size or set drop_last=False"
            )
        self.shuffle, self.augment, self.drop_last = shuffle, augment, drop_last
        self.normalization = normalization
        self._gen = torch.Generator().manual_seed(seed)
        # shards share the order generator; each augments with its own
        self._aug = self._gen if world_size == 1 else torch.Generator().manual_seed(seed + 7919 * (rank + 1))

    def sharded(self, rank: int, world_size: int) -> CifarLoader:
        """This loader's shard ``rank`` of ``world_size`` (a ``DistributedSampler`` equivalent).

        Every shard draws the same epoch order and keeps positions ``rank, rank + world_size,
        ...`` of it, padded by wrapping around so that all shards have the same length.
        """
        return CifarLoader(self.data, self.batch_size, self.shuffle, self.augment, self.seed,
                           self.drop_last, self.normalization, rank=rank, world_size=world_size)

    def restarted(self) -> CifarLoader:
        """The same loader back at its first epoch: the same batches, in the same order, as
        this loader yielded before any ``iter()`` (so that several runs see the same data)."""
        return self.sharded(self.rank, self.world_size)

    def state_dict(self) -> dict:
        """Where the loader is in its stream of epochs: its generators' states (the epoch order,
        the augmentation), so that a resumed run draws the same batches (``ehap_fx.checkpoint``)."""
        return {"order": self._gen.get_state(), "augment": self._aug.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self._gen.set_state(state["order"])
        self._aug.set_state(state["augment"])

    def _local_size(self) -> int:
        return -(-len(self.data) // self.world_size)

    @property
    def synthetic(self) -> bool:
        return self.data.synthetic

    def __len__(self) -> int:
        n, b = self._local_size(), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.data)
        order = torch.randperm(n, generator=self._gen) if self.shuffle else torch.arange(n)
        if self.world_size > 1:
            padded = self._local_size() * self.world_size
            order = order.repeat(-(-padded // n))[:padded][self.rank::self.world_size]
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            idx = order[start:start + self.batch_size]
            images = self.data.images[idx]  # (B, 3, 32, 32) uint8
            if self.augment:
                images = augment_batch(images, self._aug)
            yield self.normalization(images), self.data.labels[idx]


def augment_batch(images: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Standard CIFAR augmentation on a uint8 batch: random crop after ``pad`` zero pixels
    on each side, then a horizontal flip with probability 1/2. Shapes are kept.

    One ``gather`` over the flattened padded images does crop and flip together.
    """
    b, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))  # (B, C, H+2p, W+2p)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    flip = torch.rand(b, generator=gen) < 0.5
    cols = torch.arange(w).expand(b, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols) + dx[:, None]  # (B, W)
    rows = dy[:, None] + torch.arange(h)  # (B, H)
    index = rows[:, :, None] * (w + 2 * pad) + cols[:, None, :]  # (B, H, W) into H+2p x W+2p
    index = index.view(b, 1, h * w).expand(b, c, h * w)
    return padded.view(b, c, -1).gather(2, index).view(b, c, h, w)  # (B, C, H, W)


def load_cifar(
    root: str | Path, name: str = "cifar10", split: str = "train", *, download: bool = False
) -> CifarData:
    """Read one split of CIFAR-10 or CIFAR-100 from ``root``.

    ``root`` is the folder holding ``cifar-10-batches-py/`` (or ``cifar-100-python/``), or
    that folder itself. With ``download=True`` a missing dataset is first fetched through
    torchvision (needs internet). A wrong directory raises :class:`DataError` naming the
    files expected and the path looked at.
    """
    if name not in LAYOUTS:
        raise DataError(f"unknown dataset name={name!r}; known: {', '.join(LAYOUTS)}")
    if split not in SPLITS:
        raise DataError(f"unknown split={split!r}; known: {', '.join(SPLITS)}")
    layout = LAYOUTS[name]
    folder = _find_folder(Path(root).expanduser(), layout)
    if folder is None and download:
        _download(Path(root).expanduser(), name)
        folder = _find_folder(Path(root).expanduser(), layout)
    if folder is None:
        raise DataError(_missing_message(Path(root), layout, name))
    files = layout.train if split == "train" else layout.test
    parts = [_read_batch(folder / f, layout.label_key) for f in files]
    images = torch.cat([p[0] for p in parts])
    labels = torch.cat([p[1] for p in parts])
    classes = _read_classes(folder / layout.meta, layout)
    if int(labels.max()) >= len(classes) or int(labels.min()) < 0:
        raise DataError(f"{folder}: labels span [{int(labels.min())}, {int(labels.max())}], "
                        f"outside the {len(classes)} classes in {layout.meta}")
    return CifarData(images, labels, classes, name, split, root=folder)


def _find_folder(root: Path, layout: _Layout) -> Path | None:
    needed = (*layout.train, *layout.test, layout.meta)
    for folder in (root / layout.folder, root):
        if all((folder / f).is_file() for f in needed):
            return folder
    return None


def _missing_message(root: Path, layout: _Layout, name: str) -> str:
    needed = (*layout.train, *layout.test, layout.meta)
    folder = root / layout.folder
    looked = folder if folder.is_dir() else root
    absent = [f for f in needed if not (looked / f).is_file()]
    return (
        f"{name} not found: looked in {str(looked)!r} for {layout.folder}/ holding "
        f"{', '.join(needed)} (missing: {', '.join(absent)}). Point the path at the folder "
        f"that contains {layout.folder}/ (the official CIFAR 'python version' layout), "
        "or pass download=True (--download) to fetch it through torchvision."
    )


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="latin1")
    except Exception as e:  # truncated files, wrong format: all "not a CIFAR batch"
        raise DataError(f"{path}: not a readable CIFAR pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return obj


def _read_batch(path: Path, label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 3, 32, 32), labels int64 (N,)) of one official batch file."""
    batch = _unpickle(path)
    if "data" not in batch or label_key not in batch:
        raise DataError(f"{path}: needs keys 'data' and {label_key!r}, has {sorted(batch)}")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: 'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path}: {labels.shape[0]} labels for {data.shape[0]} images")
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())  # rows are R, G, B planes
    return images, torch.from_numpy(labels)


def _read_classes(path: Path, layout: _Layout) -> tuple[str, ...]:
    meta = _unpickle(path)
    names = meta.get(layout.names_key)
    if not names or len(names) != layout.num_classes:
        raise DataError(f"{path}: {layout.names_key!r} must list {layout.num_classes} "
                        f"class names, got {names!r:.80}")
    return tuple(str(n) for n in names)


def _download(root: Path, name: str) -> None:
    """Fetch the official archive through torchvision (md5-checked) into ``root``."""
    try:
        from torchvision import datasets
    except ImportError as e:
        raise DataError("download=True needs torchvision: pip install torchvision") from e
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        for train in (True, False):
            cls(str(root), train=train, download=True)
    except Exception as e:  # network errors come in many types
        raise DataError(f"downloading {name} into {str(root)!r} failed: {e}") from e


def load_digits(split: str = "train", *, size: int = 16, test_fraction: float = 0.2) -> CifarData:
    """scikit-learn's handwritten digits (1,797 real 8x8 grey images of 0-9, shipped inside the
    package: no download) as a CIFAR-shaped split: bilinearly upsampled to ``size`` x ``size``,
    grey repeated on three channels, uint8. Train and test are a fixed stratified split
    (``test_fraction`` of each class in test: 1,437 / 360 images by default).

    The embedded default of ``ehap compress``: real images on any machine, offline.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split={split!r}; known: {', '.join(SPLITS)}")
    try:  # scikit-learn is imported here only: the rest of the package does not need it
        from sklearn.datasets import load_digits as sklearn_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise DataError(f"the digits data need scikit-learn ({e}): pip install scikit-learn") from e
    digits = sklearn_digits()
    index = np.arange(len(digits.target))
    train, test = train_test_split(index, test_size=test_fraction, stratify=digits.target, random_state=0)
    keep = np.sort(train if split == "train" else test)
    grey = torch.from_numpy(digits.images[keep]).float().div_(16.0).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
    grey = torch.nn.functional.interpolate(grey, size=(size, size), mode="bilinear", align_corners=False)
    images = grey.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(digits.target[keep]).long()
    return CifarData(images, labels, tuple(str(i) for i in range(10)), DIGITS_NAME, split)


def synthetic_cifar(
    n: int = 512, num_classes: int = 10, seed: int = 0, split: str = "train"
) -> CifarData:
    """``n`` random CIFAR-shaped images, labelled as synthetic.

    Each class has its own random template of 4x4 colour blocks (8x8 pixels each); an
    image is its class template plus uniform noise, so the labels are learnable (a short
    fine-tune lowers the loss) while the data carry no real-world meaning. Classes are
    balanced (``i % num_classes``); the ``"test"`` split of a seed has the same class
    templates and other images.
    """
    if n < 1 or num_classes < 1:
        raise ValueError(f"synthetic_cifar needs n={n} >= 1 and num_classes={num_classes} >= 1")
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, 256, (num_classes, 3, 4, 4), generator=gen)
    templates = coarse.repeat_interleave(8, 2).repeat_interleave(8, 3)  # (K, 3, 32, 32)
    gen.manual_seed(2 * seed + (split != "train"))  # other images, same classes, per split
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=gen)]
    noise = torch.randint(-96, 97, (n, 3, 32, 32), generator=gen)
    images = (templates[labels] + noise).clamp_(0, 255).to(torch.uint8)
    classes = tuple(f"class_{i}" for i in range(num_classes))
    return CifarData(images, labels, classes, SYNTHETIC_NAME, split, synthetic=True)


# ---------------------------------------------------------------------------------------------
# Unlabelled batches: images alone
# ---------------------------------------------------------------------------------------------


def unlabelled_batches(data, dense_targets: bool = False) -> list | None:
    """``data`` as a list of image batches when it holds images alone, else None.

    Images alone: a tensor (one batch), or a list/tuple of tensors that is not an ``(x, y)``
    pair (a pair's second tensor has fewer dimensions or an integer dtype: labels).

    >>> len(unlabelled_batches(torch.zeros(4, 3, 8, 8))), unlabelled_batches([torch.zeros(2, 3)])[0].shape
    (1, torch.Size([2, 3]))
    >>> unlabelled_batches((torch.zeros(4, 3, 8, 8), torch.zeros(4, dtype=torch.long))) is None
    True
    """
    if torch.is_tensor(data):
        return [data]
    if not isinstance(data, (tuple, list)) or not data or not all(torch.is_tensor(t) for t in data):
        return None
    if len(data) == 2 and (data[1].dim() < data[0].dim() or not data[1].is_floating_point()
                           or (dense_targets and isinstance(data, tuple) and len(data[0]) == len(data[1]))):
        return None  # an (x, y) pair
    return list(data)


def yields_images_only(data, dense_targets: bool = False) -> bool:
    """Whether ``data`` (a list or a re-iterable loader) yields bare image tensors, not
    ``(x, y)`` batches; a one-shot iterator is not read ahead (False). ``dense_targets``: a
    ``loss_fn`` compares outputs with targets shaped like images (masks, maps), so a tuple of
    two tensors of one length is an ``(x, y)`` pair (a list stays a list of batches)."""
    if unlabelled_batches(data, dense_targets) is not None:
        return True
    if isinstance(data, (tuple, list)) and data and all(torch.is_tensor(t) for t in data):
        return False  # an (x, y) pair of tensors
    if data is None or isinstance(data, CifarLoader):
        return False
    dataset = getattr(data, "dataset", None)
    if isinstance(data, torch.utils.data.DataLoader) and hasattr(dataset, "__getitem__"):
        return len(dataset) > 0 and torch.is_tensor(dataset[0])  # a sample, not a shuffled batch
    if iter(data) is data:
        return False
    for batch in data:
        return torch.is_tensor(batch)
    return False


class OwnLabels:
    """``(x, y)`` batches from batches of images alone: ``y`` drawn from ``model``'s own softmax
    (in eval mode, without gradients; the model's mode is restored), seeded, so every pass over
    the batches yields the same labels. Monte-Carlo labels are what a Gauss-Newton ranking needs
    from unlabelled images: the Gauss-Newton (Fisher) matrix is the expectation over them, and
    the loss gradient averages to zero around the model's own decisions (argmax labels would
    bias it toward the predicted class)."""

    def __init__(self, images, model: torch.nn.Module, seed: int = 0) -> None:
        self.images = unlabelled_batches(images) or images
        self.model, self.seed = model, seed

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(self.seed)
        for x in self.images:
            yield x, self.labels(x, gen)

    @torch.no_grad()
    def labels(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        was = self.model.training
        self.model.eval()
        try:
            device = next(self.model.parameters(), torch.empty(0)).device
            p = torch.softmax(self.model(x.to(device)).float().cpu(), 1)
            return torch.multinomial(p, 1, generator=gen).squeeze(1).to(x.device)  # (N,)
        finally:
            self.model.train(was)
