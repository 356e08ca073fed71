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
    assert found == {"README.md": 2, "architecture.md": 1, "core.md": 0, "distributed.md": 1, "hessian.md": 1,
                     "int8.md": 1, "mutation.md": 0, "prunability.md": 0, "prunability_libs.md": 0,
                     "results.md": 0}, \
        "a snippet was added: give it a test here"


def _distributed_did(ns: dict, folder: Path) -> None:
    """compress() pruned to its default target, and rank 0 (the only one) saved the model."""
    result = ns["result"]
    assert result.report.cost_after["macs_ratio"] <= 0.5
    saved = torch.load(folder / "pruned.pt", weights_only=False)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(saved.eval()(x), result.pruned.eval()(x), rtol=0, atol=0)


def _hessian_did(ns: dict, folder: Path) -> None:
    """One trace and standard error per output channel; a score and an error per group channel."""
    result, groups = ns["result"], ns["groups"]
    width = ns["model"].get_submodule("layer1.0.conv1").out_channels
    assert result.traces["layer1.0.conv1"].shape == result.stderr["layer1.0.conv1"].shape == (width,)
    for named in (ns["scores"], ns["errors"]):
        assert {k: tuple(v.shape) for k, v in named.items()} == {g.id: (g.size,) for g in groups}
    assert "choice" in result.summary()


def _int8_did(ns: dict, folder: Path) -> None:
    """QAT ran (checked against PTQ on held-out batches) and the ONNX file is all QLinearConv."""
    q, report = ns["q"], ns["report"]
    assert q.steps == 4 and q.check["kept"] == q.mode  # one epoch of 4 batches: 256 images, 10 % held out
    assert (folder / "out" / "model_int8.onnx").is_file() and report.quantized_conv_fraction == 1.0
    assert 0.0 <= report.argmax_agreement <= 1.0 and report.summary().startswith("out/model_int8.onnx")


def _architecture_did(ns: dict, folder: Path) -> None:
    """The user's rule made Snake one call, and conv 0's 8 channels prune through it."""
    gm = ns["gm"]
    assert [g.size for g in groups_of(gm).prunable] == [8]
    assert [type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes if n.op == "call_module"] == \
        ["Conv2d", "Snake", "Conv2d"]


@pytest.mark.parametrize(("doc", "did"), [("distributed.md", _distributed_did), ("hessian.md", _hessian_did),
                                          ("int8.md", _int8_did), ("architecture.md", _architecture_did)])
def test_docs_snippets_run(doc, did, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # int8.md writes out/model_int8.onnx
    (tmp_path / "out").mkdir()
    ns = namespace()
    for code in snippets(ROOT / "docs" / doc):
        exec(compile(code, doc, "exec"), ns)
    did(ns, tmp_path)


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
    assert set(report.accuracy) == {"dense", "dense_finetuned", "pruned", "compensated", "finetuned", "int8_torch", "int8_onnx"}


def test_the_defaults_the_docs_state_are_the_codes():
    """Each default a page states, read from the page and from the code (so neither can drift)."""
    import inspect

    from ehap_fx.passes.quantize import QuantizeOptions

    from ehap_fx.compress import RECIPE, compress
    from ehap_fx.scoring import HessianOptions

    readme = (ROOT / "README.md").read_text()
    hessian = (ROOT / "docs" / "hessian.md").read_text()
    core = (ROOT / "docs" / "core.md").read_text()
    defaults = {k: p.default for k, p in inspect.signature(compress).parameters.items()}
    stated = {
        "INT8 mode (README)": (re.search(r"INT8 is \*\*(\w+)\*\* by default", readme)[1].lower(),
                               RECIPE.quant_mode),
        "INT8 backend (README)": (re.search(r"`--backend pt2e\|fx` \(default \*\*(\w+)\*\*", readme)[1].lower(),
                                  QuantizeOptions().backend),
        "granularity (README)": (re.search(r"`--granularity channel\|block\|both` \(.*?(\w+): the default\)",
                                           readme, re.S)[1], RECIPE.granularity),
        "estimator (hessian.md)": (re.search(r'\| `"(\w+)"` \(default\) \|', hessian)[1],
                                   HessianOptions().estimator),
        "estimator (hessian.md, prose)": (re.search(r'\*\*Default: `estimator="(\w+)"`\*\*', hessian)[1],
                                          HessianOptions().estimator),
        "pass options (docstring)": (re.search(r"The defaults: \w+ backend, (\w+)", QuantizeOptions.__doc__)[1]
                                     .lower(), QuantizeOptions().mode),
        "pass backend (docstring)": (re.search(r"The defaults: (\w+) backend", QuantizeOptions.__doc__)[1].lower(),
                                     QuantizeOptions().backend),
        "capture (core.md)": (re.search(r'`capture="(\w+)"` \(the default', core)[1], defaults["capture"]),
    }
    wrong = {what: pair for what, pair in stated.items() if pair[0] != pair[1]}
    assert not wrong, f"docs and code disagree (stated, code): {wrong}"
    assert len(re.findall(r'\(default\)', hessian.split("## ")[2])) <= 1, "two estimators called the default"


def test_readme_names_report_md_sections_in_the_order_they_are_written():
    """README's outputs table lists report.md's sections as ``render_markdown`` writes them (issue
    28: the table had drifted from the report's order and missed sections)."""
    from ehap_fx import report as rep

    source = Path(rep.__file__).read_text()
    written = re.findall(r'"## ([A-Z][A-Za-z0-9 -]+)', source)
    written = list(dict.fromkeys(w.split(":")[0].split(" (")[0].strip() for w in written))  # each once
    row = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| `report.md` |"))
    named = [n.split(":")[0] for n in re.findall(r"\*\*([^*]+)\*\*", row)]
    firsts = [w.split()[0] for w in written]
    assert [n.split()[0] for n in named] == firsts, (named, written)
