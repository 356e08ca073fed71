"""Every Python snippet of README.md and docs/ runs, on the objects it names (so none can rot).

The snippets name objects the text introduces (``model``, ``loader``, ``groups``, ...): each
runs in a namespace holding small real ones (a ResNet-8 and synthetic CIFAR images). The
README's ``compress`` example runs on the shared CIFAR-10 and pretrained ResNet-56 when present,
on a 256-image slice of each split (its one epoch of fine-tuning and of QAT are then 2 steps).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from ehap_fx.passes.group import group_channels, groups_of
from ehap_fx.passes.trace import trace

from ehap_fx.data import synthetic_cifar
from ehap_fx.models import get_model

ROOT = Path(__file__).resolve().parents[1]


def snippets(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def namespace() -> dict:
    """What the docs' snippets refer to: a grouped ResNet-8, its data, a Hessian batch."""
    model = group_channels(trace(get_model("resnet8").eval(), torch.zeros(1, 3, 32, 32))).graph_module
    train = synthetic_cifar(256, seed=0)
    loader = train.loader(64, shuffle=True, seed=0)
    x, y = next(iter(train.loader(256)))  # normalised float images, as every loader yields
    return {"torch": torch, "model": model, "example": torch.zeros(1, 3, 32, 32), "loader": loader,
            "x": x, "y": y, "groups": groups_of(model).prunable, "pruned_gm": model,
            "example_input": torch.zeros(1, 3, 32, 32), "train_loader": loader,
            "test_images": next(iter(synthetic_cifar(512, seed=1, split="test").loader(512)))[0]}


def test_every_snippet_is_found():
    found = {p.name: len(snippets(p)) for p in (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))}
    assert found == {"README.md": 2, "core.md": 0, "distributed.md": 1, "hessian.md": 1, "int8.md": 1,
                     "prunability.md": 0, "prunability_libs.md": 0, "results.md": 0}, \
        "a snippet was added: give it a test here"


@pytest.mark.parametrize("doc", ["distributed.md", "hessian.md", "int8.md"])
def test_docs_snippets_run(doc, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # int8.md writes out/model_int8.onnx
    (tmp_path / "out").mkdir()
    for code in snippets(ROOT / "docs" / doc):
        exec(compile(code, doc, "exec"), namespace())


def test_readme_pass_chain_runs():
    ns = namespace()
    exec(compile(snippets(ROOT / "README.md")[1], "README.md", "exec"), ns)
    assert ns["small"](torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert ns["plan"].keep  # something was pruned


@pytest.mark.slow
def test_readme_compress_example_runs(cifar10_root, weights_dir, tmp_path, monkeypatch):
    import ehap_fx.data

    load = ehap_fx.data.load_cifar
    monkeypatch.setattr(ehap_fx.data, "load_cifar", lambda *a, **k: load(*a, **k).head(256))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    code = snippets(ROOT / "README.md")[0].replace('"../shared/', f'"{cifar10_root.parent}/')
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    report = ns["result"].report
    assert report.cost_after["macs_ratio"] <= 0.5 and (tmp_path / "out" / "model_int8.onnx").is_file()
    assert set(report.accuracy) == {"dense", "dense_finetuned", "pruned", "finetuned", "int8_torch", "int8_onnx"}
