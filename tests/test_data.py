"""CIFAR data layer: the official python layout, clear errors, batched augmentation."""

import pickle

import numpy as np
import pytest
import torch

from ehap_fx.data import (
    CIFAR10_NORM,
    IMAGENET_NORM,
    SYNTHETIC_NAME,
    CifarData,
    augment_batch,
    load_cifar,
    synthetic_cifar,
)
from ehap_fx.errors import DataError, EhapError


def _write(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def fake_cifar10(root, per_batch=20):
    """A tiny CIFAR-10 in the official layout; pixel value == image index mod 256."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(files):
        idx = np.arange(k * per_batch, (k + 1) * per_batch)
        data = np.repeat((idx % 256).astype(np.uint8)[:, None], 3072, axis=1)
        _write(folder / name, {"data": data, "labels": list(idx % 10), "batch_label": name})
    _write(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    return folder


def fake_cifar100(root, n=30):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("train", "test"):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        _write(folder / name, {"data": data, "fine_labels": list(range(n)),
                               "coarse_labels": [0] * n})
    _write(folder / "meta", {"fine_label_names": [f"f{i}" for i in range(100)],
                             "coarse_label_names": [f"g{i}" for i in range(20)]})
    return folder


# --------------------------------------------------------------------------- reading

def test_real_cifar10_shapes_and_counts(cifar10_root):
    test = load_cifar(cifar10_root, "cifar10", "test")
    assert tuple(test.images.shape) == (10_000, 3, 32, 32)
    assert test.images.dtype == torch.uint8 and test.labels.dtype == torch.int64
    assert test.class_counts().tolist() == [1_000] * 10
    assert test.classes[:3] == ("airplane", "automobile", "bird")
    assert not test.synthetic and test.name == "cifar10"
    train = load_cifar(cifar10_root / "cifar-10-batches-py", "cifar10", "train")
    assert len(train) == 50_000 and train.class_counts().tolist() == [5_000] * 10


def test_real_cifar10_pixel_layout(cifar10_root):
    """Row i of a batch is 1024 R, 1024 G, 1024 B values: the tensor holds the same bytes."""
    with open(cifar10_root / "cifar-10-batches-py" / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="latin1")
    test = load_cifar(cifar10_root, "cifar10", "test")
    assert torch.equal(test.images[7, 1].flatten(), torch.from_numpy(raw["data"][7, 1024:2048]))
    assert test.labels[:5].tolist() == raw["labels"][:5]


def test_fake_cifar10_order_and_splits(tmp_path):
    fake_cifar10(tmp_path)
    train = load_cifar(tmp_path, "cifar10", "train")
    test = load_cifar(tmp_path, "cifar10", "test")
    assert len(train) == 100 and len(test) == 20
    assert train.images[:, 0, 0, 0].tolist() == list(range(100))  # batches 1..5 in order
    assert test.images[:, 2, 31, 31].tolist() == list(range(100, 120))
    assert train.class_counts().tolist() == [10] * 10


def test_fake_cifar100_fine_labels(tmp_path):
    folder = fake_cifar100(tmp_path)
    data = load_cifar(tmp_path, "cifar100", "test")
    assert data.num_classes == 100 and data.labels.tolist() == list(range(30))
    assert data.classes[99] == "f99" and data.root == folder
    same = load_cifar(folder, "cifar100", "test")  # the layout folder itself works too
    assert torch.equal(same.images, data.images)


def test_wrong_directory_names_expected_files(tmp_path):
    with pytest.raises(DataError) as info:
        load_cifar(tmp_path, "cifar10", "train")
    message = str(info.value)
    assert str(tmp_path) in message
    assert "cifar-10-batches-py/" in message and "data_batch_1" in message
    assert "test_batch" in message and "batches.meta" in message and "download" in message
    assert isinstance(info.value, EhapError)
    with pytest.raises(DataError, match=r"cifar-100-python/ holding train, test, meta"):
        load_cifar(tmp_path, "cifar100")


def test_partial_directory_names_missing_file(tmp_path):
    folder = fake_cifar10(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"missing: data_batch_3\)") as info:
        load_cifar(tmp_path)
    assert str(folder) in str(info.value)


def test_malformed_files(tmp_path):
    folder = fake_cifar10(tmp_path)
    (folder / "test_batch").write_bytes(b"\x00garbage")
    with pytest.raises(DataError, match="test_batch: not a readable CIFAR pickle"):
        load_cifar(tmp_path, split="test")
    _write(folder / "test_batch", {"data": np.zeros((4, 100), np.uint8), "labels": [0] * 4})
    with pytest.raises(DataError, match=r"'data' must be uint8 \(N, 3072\), got uint8 \(4, 100\)"):
        load_cifar(tmp_path, split="test")
    _write(folder / "test_batch", {"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2, 12]})
    with pytest.raises(DataError, match=r"labels span \[0, 12\], outside the 10 classes"):
        load_cifar(tmp_path, split="test")


def test_unknown_name_and_split(tmp_path):
    with pytest.raises(DataError, match="unknown dataset name='mnist'; known: cifar10, cifar100"):
        load_cifar(tmp_path, "mnist")
    with pytest.raises(DataError, match="unknown split='val'"):
        load_cifar(tmp_path, "cifar10", "val")


# --------------------------------------------------------------------------- synthetic

def test_synthetic_is_labelled_balanced_and_seeded():
    data = synthetic_cifar(100, num_classes=10, seed=3)
    assert data.synthetic and data.name == SYNTHETIC_NAME == "synthetic (random) CIFAR-shaped data"
    assert SYNTHETIC_NAME in data.describe()
    assert data.class_counts().tolist() == [10] * 10
    assert torch.equal(data.images, synthetic_cifar(100, 10, seed=3).images)
    assert not torch.equal(data.images, synthetic_cifar(100, 10, seed=4).images)
    assert data.loader(10).synthetic


# --------------------------------------------------------------------------- loader

def test_loader_batches_len_limit_drop_last():
    data = synthetic_cifar(50)
    assert [y.shape[0] for _, y in data.loader(16)] == [16, 16, 16, 2]
    assert len(data.loader(16)) == 4 and len(data.loader(16, drop_last=True)) == 3
    assert [y.shape[0] for _, y in data.loader(16, drop_last=True)] == [16, 16, 16]
    assert [y.shape[0] for _, y in data.loader(16, limit=20)] == [16, 4]
    with pytest.raises(DataError, match="drop_last with batch_size=64 > 50 images"):
        data.loader(64, drop_last=True)


def test_loader_normalises_without_augmentation():
    data = synthetic_cifar(8)
    x, y = next(iter(data.loader(8, normalization=IMAGENET_NORM)))
    mean = torch.tensor(IMAGENET_NORM.mean).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_NORM.std).view(1, 3, 1, 1)
    torch.testing.assert_close(x * std + mean, data.images.float() / 255)
    assert torch.equal(y, data.labels)


def test_shuffle_is_a_seeded_permutation_per_epoch():
    data = CifarData(torch.zeros(40, 3, 32, 32, dtype=torch.uint8), torch.arange(40),
                     tuple(f"c{i}" for i in range(40)), "toy", "train")
    loader = data.loader(8, shuffle=True, seed=5)
    first = torch.cat([y for _, y in loader])
    second = torch.cat([y for _, y in loader])
    assert sorted(first.tolist()) == sorted(data.labels.tolist())
    assert not torch.equal(first, second)  # a new order each epoch
    again = data.loader(8, shuffle=True, seed=5)
    assert torch.equal(torch.cat([y for _, y in again]), first)


def _is_crop_of(out: torch.Tensor, img: torch.Tensor, pad: int = 4) -> bool:
    """Whether ``out`` is a 32x32 window of zero-padded ``img``, flipped or not."""
    padded = torch.nn.functional.pad(img, (pad, pad, pad, pad))
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            window = padded[:, dy:dy + 32, dx:dx + 32]
            if torch.equal(out, window) or torch.equal(out, window.flip(2)):
                return True
    return False


def test_augmentation_is_crop_and_flip():
    images = synthetic_cifar(16, seed=1).images
    gen = torch.Generator().manual_seed(0)
    out = augment_batch(images, gen)
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert all(_is_crop_of(out[i], images[i]) for i in range(16))
    assert sum(not torch.equal(out[i], images[i]) for i in range(16)) >= 12


def test_augmented_loader_is_seeded_reproducible():
    data = synthetic_cifar(32, seed=2)
    a = [x for x, _ in data.loader(16, shuffle=True, augment=True, seed=7)]
    b = [x for x, _ in data.loader(16, shuffle=True, augment=True, seed=7)]
    c = [x for x, _ in data.loader(16, shuffle=True, augment=True, seed=8)]
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == (16, 3, 32, 32) and a[0].dtype == torch.float32


def test_restarted_loader_replays_the_first_epoch():
    """Each iter() is a new epoch (another order, other crops); restarted() goes back to the
    first, as a fresh loader with the same arguments would."""
    loader = synthetic_cifar(32, seed=2).loader(16, shuffle=True, augment=True, seed=7)
    first = [(x, y) for x, y in loader]
    second = [(x, y) for x, y in loader]
    again = [(x, y) for x, y in loader.restarted()]
    assert not torch.equal(first[0][0], second[0][0])
    for (x, y), (x2, y2) in zip(first, again, strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_padding_is_zero_pixels_before_normalisation():
    """A white image shifted by the crop shows black (0) borders, normalised like 0."""
    data = CifarData(torch.full((64, 3, 32, 32), 255, dtype=torch.uint8),
                     torch.zeros(64, dtype=torch.int64), ("a",), "white", "train")
    x, _ = next(iter(data.loader(64, augment=True, seed=0, normalization=CIFAR10_NORM)))
    black = (0 - CIFAR10_NORM.mean[0]) / CIFAR10_NORM.std[0]
    white = (1 - CIFAR10_NORM.mean[0]) / CIFAR10_NORM.std[0]
    values = x[:, 0].unique()
    torch.testing.assert_close(values, torch.tensor([black, white]))


def test_download_goes_through_torchvision_then_our_reader(tmp_path, monkeypatch):
    """``download=True`` asks torchvision for the files, then reads them like any copy."""
    from torchvision import datasets

    calls = []

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            if not (tmp_path / "cifar-10-batches-py").exists():
                fake_cifar10(tmp_path)

    monkeypatch.setattr(datasets, "CIFAR10", FakeCIFAR10)
    data = load_cifar(tmp_path, "cifar10", "test", download=True)
    assert calls == [(str(tmp_path), True, True), (str(tmp_path), False, True)]
    assert len(data) == 20
    load_cifar(tmp_path, "cifar10", "test", download=True)  # present: no second download
    assert len(calls) == 2


def test_download_failure_is_a_data_error(tmp_path, monkeypatch):
    from torchvision import datasets

    def offline(root, train, download):
        raise RuntimeError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(datasets, "CIFAR100", offline)
    with pytest.raises(DataError, match="downloading cifar100 into .* failed: <urlopen error"):
        load_cifar(tmp_path, "cifar100", download=True)
