"""``compress()`` at the edge, as a new user calls it: shorthand arguments, images without
labels, wrong kinds of values (one clear message naming the fix), and progress written to a log.

    compress(model, x, target=0.5)            == compress(model, x, target=RECIPE.target(macs=0.5))
    compress(model, x, quantize=False)        -> no INT8
    compress(model, x, data=[images])         -> ranked against the model's own predictions
    compress(model, x, data=[images], finetune_options=...)  -> DataError naming the step
    compress(model, x, target=1.5, export="out/m.onnx")      -> TargetError, out/ not created
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from ehap_fx import RECIPE, compress
from ehap_fx.data import OwnLabels, unlabelled_batches, yields_images_only
from ehap_fx.errors import ArgumentError, DataError, EhapError, OptionError, TargetError
from ehap_fx.progress import LineProgress, bar
from ehap_fx.scoring import HessianOptions
from ehap_fx.train import FinetuneOptions, finetune

X = torch.randn(1, 3, 16, 16)
HESSIAN = HessianOptions(batch_size=16, progress=False)


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    ).eval()


IMAGES = [torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]


def test_a_float_target_is_the_macs_fraction():
    model = net()
    with pytest.warns(UserWarning, match="L1 weight magnitude"):
        short = compress(model, X, target=0.5)
    with pytest.warns(UserWarning, match="L1 weight magnitude"):
        full = compress(model, X, target=RECIPE.target(macs=0.5))
    assert short.report.target == full.report.target
    assert short.report.target["kind"] == "macs" and short.report.target["fraction"] == 0.5
    assert short.report.channels_after == full.report.channels_after
    assert short.report.cost_after["macs_ratio"] <= 0.5


def test_an_unknown_keyword_is_one_typed_line_naming_the_near_option(tmp_path):
    """compress's options are CompressOptions' fields: a misspelt one is refused before any work,
    with the field it most resembles; help(compress) lists every field as a keyword."""
    import inspect

    from ehap_fx.compress import CompressOptions

    with pytest.raises(ArgumentError, match=r"'scorr' \(did you mean 'scorer'\?\)"):
        compress(net(), X, scorr="l1", export=tmp_path / "out" / "m.onnx")
    assert not (tmp_path / "out").exists()
    shown = inspect.signature(compress).parameters
    fields = inspect.signature(CompressOptions).parameters
    assert all(shown[name].default is fields[name].default for name in fields)
    assert shown["target"].kind is inspect.Parameter.KEYWORD_ONLY and "options" not in shown


def test_quantize_false_is_no_int8_and_true_the_recipes():
    model = net()
    with pytest.warns(UserWarning):
        result = compress(model, X, quantize=False)
    assert result.quantized is None and result.report.quantize is None
    result = compress(model, X, data=IMAGES, hessian=HESSIAN, quantize=True, target=0.6)
    assert result.report.quantize["asked"] == RECIPE.quant_mode == "ptq"


@pytest.mark.parametrize(("kwargs", "error", "words"), [
    ({"target": "half"}, ArgumentError, ["target='half'", "Target(macs=0.5)", "a float"]),
    ({"target": 1.5}, TargetError, ["target=1.5", "(0, 1]"]),
    ({"target": True}, ArgumentError, ["target=True"]),
    ({"quantize": "int8"}, ArgumentError, ["quantize='int8'", "RECIPE.quantize()"]),
    ({"finetune_options": 3}, ArgumentError, ["finetune_options=3", "RECIPE.finetune(epochs=1)"]),
    ({"hessian": {"dtype": "bf16"}}, ArgumentError, ["hessian=", "HessianOptions(...)"]),
    ({"export": 7}, ArgumentError, ["export=7", "a path"]),
])
def test_wrong_kinds_name_the_fix(kwargs, error, words):
    with pytest.raises(error) as info:
        compress(net(), X, **kwargs)
    assert isinstance(info.value, EhapError)
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message


@pytest.mark.parametrize(("kwargs", "error", "words"), [
    ({"target": 1.5}, TargetError, ["target=1.5", "(0, 1]", "fraction of the MACs"]),
    ({"target": -1}, TargetError, ["target=-1", "(0, 1]"]),
    ({"target": float("nan")}, TargetError, ["target=nan", "(0, 1]"]),
    ({"quantize": "yes"}, ArgumentError, ["quantize='yes'", "RECIPE.quantize()", "True or None"]),
    ({"data": 5}, ArgumentError, ["data=5", "(images, labels) batches", "a list of tensors"]),
    ({"data": "images/"}, ArgumentError, ["data='images/'", "(images, labels) batches"]),
    ({"data": [5]}, DataError, ["data=[5, ...]", "a batch is int", "(images, labels) pair"]),
    ({"data": torch.randn(3, 16, 16)}, DataError, ["(3, 16, 16)", "example_input (1, 3, 16, 16)"]),
    ({"eval_data": 5}, ArgumentError, ["eval_data=5", "(images, labels) batches"]),
    ({"scorer": "hesian"}, OptionError, ["scorer='hesian'", "'removal'"]),
    ({"capture": "jit"}, OptionError, ["capture='jit'", "'export'"]),
    ({"teacher": "dense"}, ArgumentError, ["teacher='dense'", "nn.Module"]),
    ({"loss_fn": "ce"}, ArgumentError, ["loss_fn='ce'", "loss_fn(output, y)"]),
    ({"exclude": "fc"}, ArgumentError, ["exclude='fc'", "a list of module names"]),
    ({"compensate": 3}, ArgumentError, ["compensate=3", "CompensateOptions(...)"]),
    ({"quantize": None}, EhapError, ["export=", "quantize=RECIPE.quantize()"]),
])
def test_bad_input_is_one_typed_line_and_writes_nothing(kwargs, error, words, tmp_path):
    """A bad value of the Python API, with an export path under a folder that does not exist yet:
    one line, an ``ehap_fx.errors`` type, raised before the folder or any file is made."""
    args = {"data": IMAGES, "quantize": True, "export": tmp_path / "out" / "model_int8.onnx", **kwargs}
    with pytest.raises(error) as info:
        compress(net(), X, hessian=HESSIAN, **args)
    assert isinstance(info.value, EhapError)
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message
    assert list(tmp_path.iterdir()) == []


def test_unlabelled_batches_are_told_from_pairs():
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    assert unlabelled_batches((x, y)) is None
    assert len(unlabelled_batches(x)) == 1 and len(unlabelled_batches([x, x])) == 2
    assert yields_images_only([x]) and not yields_images_only([(x, y)])
    assert not yields_images_only(iter([x]))  # a one-shot iterator is not read ahead


def test_images_alone_rank_like_images_labelled_by_the_model():
    """The removal criterion on images alone equals the criterion on the same images labelled
    with the dense model's argmax: scores and the plan, exactly."""
    model = net()
    alone = compress(model, X, data=IMAGES, hessian=HESSIAN, target=0.6)
    labels = [model(x).argmax(1) for x in IMAGES]
    pairs = compress(model, X, data=list(zip(IMAGES, labels, strict=True)), hessian=HESSIAN, target=0.6)
    assert alone.report.ranking[0]["scorer"] == "removal"
    assert alone.report.channels_after == pairs.report.channels_after
    for a, b in zip(alone.report.groups, pairs.report.groups, strict=True):
        assert a.scores == pytest.approx(b.scores, rel=1e-6)
    assert "unlabelled" in alone.report.data
    assert not model.training  # the user's model keeps its mode


def test_own_labels_are_drawn_from_the_model_and_keep_its_mode():
    model = net().train()
    labels = OwnLabels(IMAGES[:1], model)
    (x, y), = list(labels)
    assert model.training and y.shape == (16,) and y.dtype == torch.long
    assert torch.equal(y, next(iter(labels))[1])  # the same draws on every pass
    sure = copy.deepcopy(model).eval()
    sure[-1].weight.data *= 1e4  # logits so far apart that the softmax is one-hot in float32
    (_, y_sure), = list(OwnLabels(IMAGES[:1], sure))
    assert torch.equal(y_sure, sure(x).argmax(1))
    draws = torch.cat([y for _, y in OwnLabels([x] * 64, model.eval())])
    p = torch.softmax(model(x), 1).mean(0)  # what a draw's class frequency estimates
    assert draws.bincount(minlength=10).float().div(len(draws)).sub(p).abs().max() < 5 * (0.25 / len(draws)) ** 0.5


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"finetune_options": FinetuneOptions(epochs=1)}, ["fine-tuning (finetune_options) needs labels"]),
    ({"loss_fn": lambda out, y: out.sum()},
     ["loss_fn(output, y)"]),
    ({"eval_data": IMAGES}, ["eval_data yields images without labels", "top-1"]),
])
def test_steps_that_need_labels_say_so(kwargs, words):
    with pytest.raises(DataError) as info:
        compress(net(), X, data=IMAGES, hessian=HESSIAN, **kwargs)
    assert all(w in str(info.value) for w in words), str(info.value)


def test_qat_needs_labels():
    from ehap_fx.passes.quantize import QuantizeOptions

    with pytest.raises(DataError, match=r"QAT \(quantize mode='qat'\) needs labels"):
        compress(net(), X, data=IMAGES, hessian=HESSIAN, quantize=QuantizeOptions(mode="qat"))


# ---------------------------------------------------------------------------------------------
# Progress: tqdm on a terminal, a line every N % in a log
# ---------------------------------------------------------------------------------------------


def test_progress_in_a_log_is_lines_not_frames():
    out = io.StringIO()
    progress = bar(total=138, desc="finetune", unit="step", file=out)
    assert isinstance(progress, LineProgress)
    with progress:
        for i in range(138):
            progress.set_postfix(loss=f"{i:.1f}", refresh=False)
            progress.update(1)
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert [line.split()[1] for line in lines] == [f"{p}%" for p in range(10, 101, 10)]
    assert lines[-1].startswith("finetune: 100% (138/138 step)") and lines[-1].endswith("loss=137.0")


def test_progress_that_stops_early_says_where():
    out = io.StringIO()
    with bar(total=10, desc="hessian", file=out, every=50) as progress:
        progress.update(3)
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[0]]
    assert out.getvalue().startswith("hessian: 30% (3/10 it)")


def test_finetune_progress_on_a_non_terminal(capsys):
    model = net()
    data = [(x, model(x).argmax(1)) for x in IMAGES] * 5  # 10 steps
    finetune(model, data, FinetuneOptions(epochs=1, progress=True))
    err = capsys.readouterr().err
    assert "\r" not in err
    assert err.count("finetune: ") == 10 and "finetune: 100% (10/10 step)" in err


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_default_int8_is_pt2e_on_both_captures(capture, tmp_path):
    """quantize=True on either capture: PT2E, every conv a QLinearConv in onnxruntime, the ONNX
    file agreeing with the PyTorch INT8 model; ranked and calibrated on images alone."""
    result = compress(net(), X, data=IMAGES, hessian=HESSIAN, target=0.6, quantize=True, capture=capture,
                      export=tmp_path / "m.onnx")
    assert result.report.quantize["backend"] == "pt2e" and result.report.quantize["mode"] == "ptq"
    export = result.report.export
    assert export["quantized_conv_fraction"] == 1.0 and export["op_counts"]["QLinearConv"] == 2
    assert export["argmax_agreement"] >= 0.9  # 32 images of a random net: near-ties may flip
    assert (tmp_path / "m.onnx").is_file()
