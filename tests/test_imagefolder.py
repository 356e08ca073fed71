"""The CLI on a user's own classifier and folder of images, as a new user would run it.

    DIR/train/<class>/*.png, DIR/val/<class>/*.png     (3 classes; real CIFAR-10 images when
                                                       ../shared/data is there, else class
                                                       templates plus noise, labelled synthetic)
    ehap compress --model torchvision:resnet18 | timm:resnet18 | net.py:make
                  --data DIR --input-size 32 --target-macs 0.5 --finetune-epochs 1
      -> report (top-1 at each stage, the data and its class count), PT2E INT8 ONNX verified
    bad input -> one line "ehap: error: ...", exit 1, nothing written
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from ehap_fx import cli
from ehap_fx.data import IMAGENET_NORM
from ehap_fx.errors import ModelError, WeightsError
from ehap_fx.imagefolder import layout, load_image_folder
from ehap_fx.models.resolve import library_of, load_weights, read_checkpoint, resolve_model

HAVE_TIMM = importlib.util.find_spec("timm") is not None  # CI installs only '.[test]'; both answers are checked

CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar-10-batches-py" / "test_batch"
CLASSES = ("airplane", "automobile", "bird")
# quick settings: the L1 ranking (the removal criterion is tested on the paper's models), no timing
QUICK = ["--input-size", "32", "--target-macs", "0.5", "--finetune-epochs", "1", "--scorer", "l1",
         "--bench-rounds", "0", "--quiet"]
NET = """
    from torch import nn

    def make(num_classes=10):
        return nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))

    def ten_classes():
        return make(10)
    """


def _images(per_class: int, offset: int) -> dict[str, list[np.ndarray]]:
    """``per_class`` 32x32 RGB images of each class: real CIFAR-10 test images when present."""
    if CIFAR.is_file():
        with open(CIFAR, "rb") as f:
            batch = pickle.load(f, encoding="latin1")
        data = np.asarray(batch["data"]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, 32, 32, 3)
        labels = np.asarray(batch["labels"])
        return {c: [data[i] for i in np.flatnonzero(labels == k)[offset:offset + per_class]]
                for k, c in enumerate(CLASSES)}
    gen = np.random.default_rng(offset)
    templates = np.random.default_rng(0).integers(0, 256, (len(CLASSES), 4, 4, 3))
    return {c: [np.clip(templates[k].repeat(8, 0).repeat(8, 1) + gen.integers(-40, 41, (32, 32, 3)), 0, 255)
                .astype(np.uint8) for _ in range(per_class)] for k, c in enumerate(CLASSES)}


def write_tree(root: Path, train: int = 8, val: int = 4) -> Path:
    """An ImageFolder tree of PNGs: ``train`` / ``val`` images per class."""
    for split, n, offset in (("train", train, 0), ("val", val, train)):
        for cls, images in _images(n, offset).items():
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i, img in enumerate(images):
                Image.fromarray(img).save(root / split / cls / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return write_tree(tmp_path_factory.mktemp("imagefolder") / "pets")


@pytest.fixture(scope="module")
def net_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("user") / "net.py"
    path.write_text(textwrap.dedent(NET))
    return path


def ehap(*args: str, cwd: Path, env: dict | None = None):
    return subprocess.run([sys.executable, "-m", "ehap_fx", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=900, env=env)


def check_run(out: Path, proc, model: str) -> dict:
    """What every run on the tree must show: top-1 at each stage, the data and its classes,
    a verified PT2E INT8 ONNX file of the input size, nothing half-written."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["run"]["model"] == model and report["run"]["dataset"] == "imagefolder"
    assert report["data"].startswith("imagefolder train (24 images, 3 classes)")
    assert report["run"]["num_classes"] == 3 and report["run"]["input_shape"] == [3, 32, 32]
    assert set(report["accuracy"]) == {"dense", "dense_finetuned", "pruned", "compensated", "finetuned", "int8_torch",
                                       "int8_onnx"}
    assert all(0 <= v <= 100 for v in report["accuracy"].values())
    assert report["cost_after"]["macs_ratio"] <= 0.5
    assert report["quantize"]["backend"] == "pt2e" and report["quantize"]["mode"] == "ptq"
    assert report["export"]["quantized_conv_fraction"] == 1.0
    assert report["export"]["argmax_agreement"] >= 0.9  # 12 test images
    # the ONNX file's top-1 differs from PyTorch INT8's only where their argmaxes do
    disagree = 100 * (1 - report["export"]["argmax_agreement"])
    assert abs(report["accuracy"]["int8_onnx"] - report["accuracy"]["int8_torch"]) <= disagree + 1e-9
    dims = onnx.load(str(out / "model_int8.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [3, 32, 32]
    md = (out / "report.md").read_text()
    assert "3 classes" in md and "SYNTHETIC" not in proc.stdout
    assert not list(out.parent.glob(f".{out.name}.*"))
    return report


def test_layout_is_recognised(tree, tmp_path):
    assert layout(tree) == "imagefolder" and layout(tree / "train" / "bird") == "images"
    assert layout(tmp_path) is None
    train = load_image_folder(tree, "train", size=32)
    assert train.classes == CLASSES and len(train) == 24 and train.head(6).labels == (0, 0, 1, 1, 2, 2)
    x, y = next(iter(train.loader(24, normalization=IMAGENET_NORM, workers=0)))
    assert x.shape == (24, 3, 32, 32) and y.tolist() == [0] * 8 + [1] * 8 + [2] * 8
    # decoded in a worker process: the same tensors
    x1, _ = next(iter(train.loader(24, normalization=IMAGENET_NORM, workers=1)))
    torch.testing.assert_close(x1, x)
    # evaluation batches are resized, centre-cropped and normalised pixels, nothing else
    raw = torch.from_numpy(np.array(Image.open(train.paths[0]))).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(IMAGENET_NORM.mean).view(3, 1, 1), torch.tensor(IMAGENET_NORM.std).view(3, 1, 1)
    torch.testing.assert_close(x[0], (raw - mean) / std)


@pytest.mark.slow  # 11M parameters through fp32 and INT8 exports: ~30 s on a quiet 2-core machine
def test_torchvision_model_on_an_image_folder(tree, tmp_path):
    out = tmp_path / "out"
    proc = ehap("compress", "--model", "torchvision:resnet18", "--data", str(tree), *QUICK, "--out", str(out),
                cwd=tmp_path)
    report = check_run(out, proc, "torchvision:resnet18")
    # normalisation from the library (torchvision's ImageNet weights' transforms)
    assert report["run"]["normalization"] == {"mean": list(IMAGENET_NORM.mean), "std": list(IMAGENET_NORM.std)}
    assert report["channels_before"]["conv1"] == 64 and report["channels_after"]["fc"] == 3


@pytest.mark.slow
def test_timm_model_on_an_image_folder(tree, tmp_path):
    pytest.importorskip("timm")
    out = tmp_path / "out"
    proc = ehap("compress", "--model", "timm:resnet18", "--data", str(tree), *QUICK, "--out", str(out),
                cwd=tmp_path)
    report = check_run(out, proc, "timm:resnet18")
    assert report["run"]["model_library"] == "timm"


def test_file_factory_on_an_image_folder_with_removal_ranking(tree, net_file, tmp_path):
    """``file.py:factory``, the default (removal) ranking, decoding in a worker."""
    out = tmp_path / "out"
    quick = [f for f in QUICK if f not in ("--scorer", "l1")]
    proc = ehap("compress", "--model", f"{net_file}:make", "--data", str(tree), *quick, "--workers", "1",
                "--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25", "--out", str(out), cwd=tmp_path)
    report = check_run(out, proc, f"{net_file}:make")
    assert report["ranking"][0]["scorer"] == "removal"
    assert report["run"]["normalization"] == {"mean": [0.5] * 3, "std": [0.25] * 3}
    assert report["channels_before"] == {"0": 16, "3": 32, "8": 3}


def test_images_alone_rank_and_calibrate(tree, net_file, tmp_path):
    """A folder of images without labels: ranking and PTQ calibration, no top-1, no fine-tune."""
    out = tmp_path / "out"
    args = ["compress", "--model", f"{net_file}:make", "--data", str(tree / "train"), "--num-classes", "3",
            "--input-size", "16", "--target-macs", "0.6", "--bench-rounds", "0", "--quiet", "--out", str(out)]
    assert cli.main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert "unlabelled" in report["data"] and report["accuracy"] == {}
    assert report["finetune"] is None and report["quantize"]["mode"] == "ptq"
    assert report["ranking"][0]["scorer"] == "removal" and report["export"]["quantized_conv_fraction"] == 1.0
    assert report["run"]["input_shape"] == [3, 16, 16]


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 1, nothing written
# ---------------------------------------------------------------------------------------------


def one_error_line(capsys, argv: list[str], out: Path, *words: str) -> str:
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("ehap: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert all(w in lines[0] for w in words), lines[0]
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*"))
    return lines[0]


def bad_tree(root: Path) -> Path:
    tree = write_tree(root, train=2, val=1)
    (tree / "val" / "cat").mkdir()
    return tree


def _cases(t: Path, n: Path, d: Path) -> list[tuple[list[str], list[str]]]:
    """(flags, words of the error line) of each bad input: t the tree, n the model file, d a folder."""
    small = ["--input-size", "16"]
    return [
        (["--model", "torchvision:resnet18", "--data", str(t), "--weights", "DEFAULT", *small],
         ["resnet18 IMAGENET1K_V1 are not in torch.hub's cache", "--weights FILE"]),
        (["--model", "torchvision:resnet1800", "--data", str(t), *small], ["no model 'resnet1800'"]),
        (["--model", "timm:resnet18", "--data", str(t), "--weights", "pretrained", *small],
         ["timm weights resnet18", "not in the local Hugging Face cache"] if HAVE_TIMM
         else ["needs timm, which is not installed", "pip install timm"]),
        (["--data", str(t), *small], ["is an image folder: name its model", "torchvision:resnet18"]),
        (["--model", f"{n}:nope", "--data", str(t), *small], ["cannot import 'nope'", "make"]),
        (["--model", f"{d}/missing.py:make", "--data", str(t), *small], ["is not a file"]),
        (["--model", f"{n}:ten_classes", "--data", str(t), *small], ["outputs (2, 10)", "3 classes"]),
        (["--model", f"{n}:make", "--data", str(t), "--num-classes", "2", *small], ["fewer than the 3"]),
        (["--model", f"{n}:make", "--data", str(t), "--weights", f"{d}/w.pt", *small], ["does not exist"]),
        (["--model", f"{n}:make", "--data", str(t), "--mean", "0.5", "0.5", "0.5", *small],
         ["--mean and --std together"]),
        (["--model", f"{n}:make", "--data", str(t / "train"), "--num-classes", "3", "--finetune-epochs", "1",
          *small], ["without labels", "fine-tuning"]),
        (["--model", f"{n}:make", "--data", str(t / "train"), *small], ["no class count", "--num-classes"]),
        (["--model", "resnet20", "--synthetic", "--input-size", "64"], ["--input-size resizes"]),
        (["--model", f"{n}:make", "--data", "BAD", *small], ["different class folders", "cat"]),
    ]


@pytest.mark.parametrize("case", range(14))
def test_bad_input_is_one_line(tree, net_file, tmp_path, capsys, monkeypatch, case):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty cache: nothing is downloaded
    flags, words = _cases(tree, net_file, tmp_path)[case]
    flags = [str(bad_tree(tmp_path / "bad")) if f == "BAD" else f for f in flags]
    out = tmp_path / "out"
    argv = ["compress", *flags, "--scorer", "l1", "--finetune-steps", "1", "--bench-rounds", "0", "--quiet",
            "--out", str(out)]
    one_error_line(capsys, argv, out, *words)
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    assert not cache.exists() or not any(cache.iterdir())


def test_unreadable_image_names_the_file(tmp_path, net_file, capsys):
    tree = write_tree(tmp_path / "t", train=2, val=1)
    broken = tree / "train" / "bird" / "broken.png"
    broken.write_bytes(b"not a png")
    out = tmp_path / "out"
    one_error_line(capsys, ["compress", "--model", f"{net_file}:make", "--data", str(tree), "--input-size", "16",
                            "--scorer", "l1", "--workers", "1", "--bench-rounds", "0", "--quiet", "--out",
                            str(out)], out, "broken.png", "not an image Pillow can read")


def test_timm_missing_names_pip_install(tree, tmp_path):
    fake = tmp_path / "no_timm" / "timm"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named timm')\n")
    env = {**os.environ, "PYTHONPATH": str(fake.parent)}
    out = tmp_path / "out"
    proc = ehap("compress", "--model", "timm:resnet18", "--data", str(tree), "--out", str(out), cwd=tmp_path,
                env=env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "needs timm, which is not installed: pip install timm" in proc.stderr and not out.exists()


# ---------------------------------------------------------------------------------------------
# Weights: files, checkpoints, library tags from the local cache
# ---------------------------------------------------------------------------------------------


def test_library_of():
    assert [library_of(s) for s in ("wrn-28-8", "torchvision:vgg11", "timm:vit_tiny_patch16_224",
                                    "../my/net.py:build", "pkg.mod:Net")] == [
        "ehap", "torchvision", "timm", "file", "module"]


def test_torchvision_tag_from_the_cache_replaces_the_head(tmp_path, monkeypatch):
    """A pretrained tag is read from torch.hub's cache (a file placed there, no network), its
    1000-class head replaced by one of the data's class count; the rest loads exactly."""
    from torchvision.models import ResNet18_Weights, resnet18

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    torch.manual_seed(1)
    reference = resnet18()
    torch.save(reference.state_dict(), cached)
    resolved = resolve_model("torchvision:resnet18", 3, "DEFAULT")
    assert resolved.weights == "torchvision:ResNet18_Weights.IMAGENET1K_V1"
    assert "head 'fc' replaced: 1000 -> 3" in resolved.head and resolved.model.fc.out_features == 3
    torch.testing.assert_close(resolved.model.conv1.weight, reference.conv1.weight)
    assert resolved.normalization == IMAGENET_NORM and resolved.input_size == 224


def test_weights_files_plain_checkpoint_and_foreign_head(tmp_path, net_file):
    from ehap_fx.models.resolve import _call_factory, _factory

    make = _factory(f"{net_file}:make", "file")
    trained = _call_factory("make", make, 3)
    torch.save({"epoch": 4, "state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()}},
               tmp_path / "ckpt.pt")
    model = resolve_model(f"{net_file}:make", 3, tmp_path / "ckpt.pt").model
    for k, v in trained.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v)
    torch.save(_call_factory("make", make, 10).state_dict(), tmp_path / "ten.pt")  # another head
    fresh = _call_factory("make", make, 3)
    note = load_weights(fresh, tmp_path / "ten.pt")
    assert "'8'" in note and "(10, 32)" in note and fresh[8].out_features == 3
    torch.save(trained, tmp_path / "whole.pt")  # a pickled model: code, not weights
    with pytest.raises(WeightsError, match="save model.state_dict"):
        read_checkpoint(tmp_path / "whole.pt")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(WeightsError, match="missing keys"):
        load_weights(fresh, tmp_path / "other.pt")


def test_module_attr_that_is_no_model(tmp_path):
    with pytest.raises(ModelError, match="returned a float, not a torch.nn.Module"):
        resolve_model("time:time", 3)
