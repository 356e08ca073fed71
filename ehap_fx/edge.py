"""compress()'s data at the edge: checked once, with the fix named, before any work starts.

:func:`inputs` turns what the user passed (labelled batches, images alone, nothing) into what
the steps read (:class:`Inputs`): the ranking's ``(x, y)`` batches (the model's own labels for
images alone; synthetic inputs for a Hessian scorer without data), the user's own batches for
the repair, the scorer. The options are checked where they are typed
(:class:`ehap_fx.compress.CompressOptions`).
"""

from __future__ import annotations

import copy
import functools
import logging
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ehap_fx import distributed
from ehap_fx.data import OwnLabels, yields_images_only
from ehap_fx.errors import ArgumentError, DataError, EhapError
from ehap_fx.passes.trace import call_with
from ehap_fx.scoring import HessianOptions

log = logging.getLogger("ehap_fx")


@dataclass(frozen=True)
class Inputs:
    """compress()'s data as its steps read it."""

    data: Iterable | None  # (x, y) batches: ranking, fine-tuning, calibration (None: L1, no data)
    images: Iterable | None  # the user's own batches, for the repair, which reads no labels (None: none)
    eval_data: Iterable | None  # labelled batches for top-1 at each stage
    loss_fn: Callable | None
    name: str  # what the report calls the data
    scorer: str  # the scorer that ranks: the one asked for, else the recipe's (see default_scorer)

    @functools.cached_property
    def train(self) -> Iterable | None:
        """This rank's share of ``data`` (under torchrun), one sampler for fine-tuning and QAT."""
        return distributed.shard_loader(self.data)


def inputs(model: nn.Module, example_input, data, eval_data, loss_fn, data_name: str | None, options,
           recipe_scorer: str, teacher: nn.Module | None = None) -> Inputs:
    """:class:`Inputs` from compress()'s arguments and its checked ``options``: images alone
    labelled by the model (or refused for the steps that need labels), the scorer chosen
    (``recipe_scorer`` with data), the loss checked on a first batch, synthetic inputs for a
    Hessian scorer without data (one warning says so)."""
    _kinds(teacher, loss_fn)
    _batches_of(example_input, data=data, eval_data=eval_data)
    images = data if options.compensate is not None else None  # the user's data only, never synthetic
    data, data_name = _labelled(model, data, eval_data, data_name, options, loss_fn)
    scorer = default_scorer(options.scorer, data, loss_fn, recipe_scorer)
    if scorer != "l1":
        check_loss(model, example_input, data, loss_fn, scorer)
    if data is None and scorer != "l1":
        data, data_name = synthetic_like(model, example_input, options.hessian, loss_fn)
        log.warning("no data given: ranking on %s; pass data= for a meaningful ranking", data_name)
    name = data_name or ("none (L1 ranking needs no data)" if data is None else "user data")
    return Inputs(data, images, eval_data, loss_fn, name, scorer)


def default_scorer(scorer: str | None, data, loss_fn, recipe_scorer: str) -> str:
    """The scorer asked for; else the recipe's with data (``recipe_scorer``, the CLI's default
    too), the paper's ``"hessian"`` when a ``loss_fn`` replaces cross-entropy and the recipe's is
    the removal criterion (exact for cross-entropy only), and ``"l1"`` (with one warning)
    without data."""
    if scorer is not None:
        return scorer
    if data is not None:
        return "hessian" if loss_fn is not None and recipe_scorer == "removal" else recipe_scorer
    warnings.warn(
        "compress(): no data given, so channels are ranked by L1 weight magnitude. A Hessian "
        "ranking needs data=: (inputs, labels) batches from the task (scorer='hessian' or "
        "'removal'); scorer='hessian' without data ranks on synthetic inputs labelled by the "
        "model's own predictions.",
        UserWarning,
        stacklevel=4,
    )
    return "l1"


def _model_output(model: nn.Module, example_input) -> Any:
    with torch.no_grad():
        return call_with(copy.deepcopy(model).eval(), example_input)


def check_loss(model: nn.Module, example_input, data, loss_fn, scorer: str) -> None:
    """A Hessian scorer needs one input tensor and a scalar loss of the output: say what to
    change before any estimate starts."""
    if not torch.is_tensor(example_input):
        raise EhapError(
            f"scorer={scorer!r} ranks with (x, y) tensor batches, and example_input is a "
            f"{type(example_input).__name__}: use scorer='l1' for models with several inputs"
        )
    batch = _peek(data) if data is not None else None
    out = _model_output(model, batch[0] if batch is not None else example_input)
    if loss_fn is None:
        if not torch.is_tensor(out) or out.dim() != 2:
            what = f"a {type(out).__name__}" if not torch.is_tensor(out) else f"shaped {tuple(out.shape)}"
            raise EhapError(
                f"scorer={scorer!r} needs a loss: the model's output is {what}, not (N, classes) "
                "logits; pass loss_fn=lambda output, y: ... returning a scalar (e.g. "
                "F.mse_loss(output['out'], y)), or scorer='l1'"
            )
        return
    if data is not None and batch is None:
        return  # a one-shot iterator: not read ahead
    y = batch[1] if batch is not None else _own_labels(out, loss_fn)
    try:
        loss = loss_fn(out, y)
    except Exception as e:
        raise EhapError(f"loss_fn(output, y) failed on a first batch: {type(e).__name__}: {e}") from e
    if not torch.is_tensor(loss) or loss.dim() != 0:
        shape = tuple(loss.shape) if torch.is_tensor(loss) else type(loss).__name__
        raise EhapError(
            f"loss_fn returned {shape}, not a scalar: reduce it (e.g. .mean()) so that the "
            "Hessian of one number is estimated"
        )


def _peek(data) -> tuple | None:
    """The first ``(x, y)`` batch (a few samples of it), when reading it does not consume the data."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(torch.is_tensor(t) for t in data):
        return data[0][:2], data[1][:2]  # an (x, y) pair of tensors
    if iter(data) is data:  # a one-shot iterator: leave it alone
        return None
    for x, y in data:
        return x[:2], y[:2]
    return None


def _own_labels(out, loss_fn):
    """What the model predicts, as training labels: classes for logits, else the output itself."""
    if loss_fn is None and torch.is_tensor(out) and out.dim() == 2:
        return out.argmax(1)
    return torch.utils._pytree.tree_map(lambda t: t.detach() if torch.is_tensor(t) else t, out)


def synthetic_like(model: nn.Module, example_input: torch.Tensor, hessian: HessianOptions, loss_fn=None):
    """Gaussian inputs shaped like ``example_input`` (its mean and std), as many as the Hessian
    options draw, labelled by the model's own predictions (argmax of logits; the output itself
    when ``loss_fn`` says how to compare outputs), in batches of 64 (one ``(x, y)`` pair for
    labels that are not class indices), and their name."""
    n = hessian.batch_size * hessian.n_batches
    gen = torch.Generator().manual_seed(0)
    x = example_input.detach().float()
    mean, std = float(x.mean()), float(x.std()) if x.numel() > 1 else 1.0
    std = std if std > 0 else 1.0
    work = copy.deepcopy(model).eval()
    batches = []
    with torch.no_grad():
        for i in range(0, n, 64):
            xb = torch.randn((min(64, n - i), *x.shape[1:]), generator=gen) * std + mean
            xb = xb.to(example_input.dtype)
            batches.append((xb, _own_labels(work(xb), loss_fn)))
    if not all(torch.is_tensor(y) and y.dim() == 1 for _, y in batches):
        # labels that are not class indices: one (x, y) pair (sampling.draw_batches reads a
        # list of batches only when its labels are 1-D)
        batches = (torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))
    name = (f"synthetic: {n} Gaussian inputs shaped like example_input, labelled by the model's "
            "own predictions")
    return batches, name


def _labelled(model: nn.Module, data, eval_data, data_name: str | None, options, loss_fn):
    """``(data, data_name)``: images alone (a tensor, a list of tensors, a loader of bare
    tensors) become ``(x, y)`` batches labelled by the model's own predictions, which is all
    ranking and PTQ calibration need; the steps that learn from or score against labels are
    named and refused."""
    if eval_data is not None and yields_images_only(eval_data):
        raise DataError("eval_data yields images without labels: top-1 accuracy needs (images, labels) "
                        "batches; pass labelled batches or eval_data=None")
    if data is None or not yields_images_only(data, dense_targets=loss_fn is not None):
        return data, data_name
    needs = [what for what, on in (
        ("fine-tuning (finetune_options)", options.finetune_options is not None),
        ("QAT (quantize mode='qat')", options.quantize is not None and options.quantize.mode == "qat"),
        ("loss_fn(output, y)", loss_fn is not None)) if on]
    if needs:
        raise DataError(f"data yields images without labels, and {' and '.join(needs)} needs labels: pass "
                        "(images, labels) batches, or leave those out (ranking and PTQ calibration need "
                        "none: finetune_options=None, quantize=RECIPE.quantize(), PTQ)")
    name = f"{data_name or 'user data'} (unlabelled: ranked against the dense model's own predictions)"
    return OwnLabels(data, model), name


def _kinds(teacher, loss_fn) -> None:
    for name, value, ok, fix in (
        ("teacher", teacher, isinstance(teacher, nn.Module), "an nn.Module or None"),
        ("loss_fn", loss_fn, callable(loss_fn), "a function loss_fn(output, y) -> scalar tensor, or None"),
    ):
        if value is not None and not ok:
            raise ArgumentError(f"compress({name}={value!r:.60}): expected {fix}")


def _batches_of(example_input, **data) -> None:
    """``data``/``eval_data``: something batches come from, whose first batch (of a list) is images
    or an ``(images, labels)`` pair with ``example_input``'s dimensions; one line naming what fits."""
    for name, value in data.items():
        if value is not None and not _batches(value):
            raise ArgumentError(f"compress({name}={value!r:.60}): expected (images, labels) batches such as "
                                "load_cifar(...).loader(128), images alone (a tensor or a list of tensors), "
                                "or None")
        first = value[0] if isinstance(value, (list, tuple)) and value else None
        first = value if torch.is_tensor(value) else first
        if first is not None and not torch.is_tensor(first) and not (
                isinstance(first, (list, tuple, dict)) and first):
            raise DataError(f"compress({name}=[{first!r:.40}, ...]): a batch is {type(first).__name__}; "
                            "expected a tensor of images or an (images, labels) pair")
        images = first[0] if isinstance(first, (list, tuple)) else first
        x = example_input
        if torch.is_tensor(images) and torch.is_tensor(x) and images.dim() != x.dim():
            raise DataError(f"compress({name}=...): a batch of images is {tuple(images.shape)}, "
                            f"example_input {tuple(x.shape)}: batches need the same dimensions (N first)")


def _batches(value) -> bool:
    """Something batches can be drawn from: a tensor or an iterable that is not text or a mapping."""
    if torch.is_tensor(value):
        return True
    try:
        iter(value)
    except TypeError:
        return False
    return not isinstance(value, (str, bytes, dict))
