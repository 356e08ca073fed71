"""The short quantization-aware fine-tune: ehap_fx.train.finetune plus two freezes; and
:func:`quantize`, the INT8 pass (``passes.quantize``) with this loop for QAT.

QAT follows the usual recipe (torch.ao's QAT tutorial, Krishnamoorthi 2018), starting from
the PTQ model (activation ranges calibrated first, ``passes.quantize.calibrate_ranges``): train
with fake quantization; part-way through, freeze the BatchNorm statistics (so the folded conv weights
stop moving under the quantizers), later freeze the observers (so the scales the INT8 model
will use stop moving). The freezes happen at fixed optimizer steps: a thin wrapper around the
training loader applies them when the step's batch is drawn.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ehap_fx import _meta
from ehap_fx.checkpoint import Checkpoints
from ehap_fx.errors import QuantizeError
from ehap_fx.passes import quantize as quantize_pass
from ehap_fx.passes.quantize import QuantizeOptions, QuantizeResult, quiet_quantization_warnings
from ehap_fx.train import FinetuneResult, finetune, total_steps

log = logging.getLogger("ehap_fx")


class _FreezingLoader:
    """Yields the batches of ``loader``; runs ``actions[step]`` before handing out that step."""

    def __init__(self, loader: Iterable[Any], actions: dict[int, list[Callable[[], None]]], step: int = 0):
        self.loader, self.actions, self.step = loader, actions, step
        if callable(getattr(loader, "state_dict", None)):  # its random stream, for loop checkpoints
            self.state_dict, self.load_state_dict = loader.state_dict, loader.load_state_dict

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            for action in self.actions.pop(self.step, []):
                action()
            self.step += 1
            yield batch


def freeze_schedule(steps: int, freeze_bn_after: float, freeze_observers_after: float):
    """The optimizer steps at which BN statistics and observers freeze (``None``: never).

    >>> freeze_schedule(100, 0.5, 0.75)
    (50, 75)
    >>> freeze_schedule(100, 1.0, 1.0)
    (None, None)
    """

    def at(fraction: float) -> int | None:
        return None if fraction >= 1.0 else math.floor(fraction * steps)

    return at(freeze_bn_after), at(freeze_observers_after)


def freeze_bn_stats(prepared: nn.Module, backend: str) -> None:
    """Stop updating BatchNorm running statistics; BN then normalises with them."""
    if backend == "fx":
        from torch.ao.nn.intrinsic.qat import freeze_bn_stats as freeze

        prepared.apply(freeze)
    else:
        prepared.meta[_meta.BN_FROZEN] = True
        prepared.train(prepared.training)


def freeze_observers(prepared: nn.Module, backend: str) -> None:
    """Stop updating the quantization ranges (fake quantization stays on)."""
    if backend == "fx":
        from torch.ao.quantization import disable_observer
    else:
        from torchao.quantization.pt2e import disable_observer
    prepared.apply(disable_observer)


def qat_finetune(
    prepared: nn.Module, loader: Iterable[Any], options: QuantizeOptions, teacher: nn.Module | None = None,
    checkpoints: Checkpoints | None = None,
) -> FinetuneResult:
    """Fine-tune a prepared QAT graph in place with ``options.finetune`` (distilling from
    ``teacher`` when ``options.finetune.distill`` is set), freezing BN statistics and then the
    observers at the steps ``options`` says.

    ``checkpoints`` with ``every``: the loop saves ``qat.loop.pt`` every ``every`` steps
    (``ehap_fx.train.finetune``) and resumes from it, the freezes due before the saved epoch's
    start applied again (BN freezing is a module attribute, not in the state dict); the
    resumed run ends with the weights and quantizer state of a run that never stopped."""
    uncalibrated = [n for n, m in quantize_pass.histogram_quantizers(prepared) if m.observer_enabled[0]]
    if uncalibrated:
        raise QuantizeError(
            f"{len(uncalibrated)} activation quantizers (e.g. {uncalibrated[0]}) wait for calibrated ranges: "
            "run passes.quantize.calibrate_ranges(prepared, batches, n) first "
            "(passes.quantize.quantize does), "
            "or prepare with QuantizeOptions(mode='qat', qat_ranges='moving')"
        )
    ft = options.finetune
    if teacher is None and ft.distill is not None:
        ft = dataclasses.replace(ft, distill=None)  # no teacher at hand: labels alone
    try:
        steps = total_steps(loader, ft)
    except TypeError as e:
        raise QuantizeError("QAT data must have a len() (a loader of (x, y) batches)") from e
    bn_at, obs_at = freeze_schedule(steps, options.freeze_bn_after, options.freeze_observers_after)
    actions: dict[int, list[Callable[[], None]]] = {}
    if bn_at is not None:
        actions.setdefault(bn_at, []).append(lambda: freeze_bn_stats(prepared, options.backend))
    if obs_at is not None:  # observers must see one batch first, or their scales stay empty
        actions.setdefault(max(1, obs_at), []).append(lambda: freeze_observers(prepared, options.backend))
    resumable = checkpoints is not None and checkpoints.every is not None
    saved = checkpoints.load("qat.loop") if resumable else None
    start = len(saved["losses"]) if saved is not None else 0  # the steps of the epochs it finished
    for step in sorted(s for s in actions if s < start):
        for action in actions.pop(step):
            action()
    with quiet_quantization_warnings():
        return finetune(prepared, _FreezingLoader(loader, actions, start), ft,
                        teacher=teacher if ft.distill is not None else None,
                        checkpoints=checkpoints, name="qat")


def quantize_int8(
    model: nn.Module,
    example_input: torch.Tensor,
    data: Iterable[Any] | None,
    options: QuantizeOptions = QuantizeOptions(),
    *,
    teacher: nn.Module | None = None,
    calibration: Iterable[Any] | None = None,
    check: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    checkpoints: Checkpoints | None = None,
) -> QuantizeResult:
    """The recipe's INT8 step: the pass ``passes.quantize.quantize`` (graph → ``QuantizeResult``,
    QAT only with a loop given) with :func:`qat_finetune` as its QAT loop (PTQ: the same);
    ``teacher`` is distilled from when ``options.finetune.distill`` is set.

    QAT's activation ranges are calibrated (``options.qat_ranges``) on the first
    ``calibration_batches`` batches of ``calibration`` (default ``data``), so QAT starts from
    the PTQ model of those batches. With ``options.ptq_fallback`` (the default) it earns its
    cost or is dropped: that PTQ model is made as well, both INT8 models are scored by
    cross-entropy on ``check``, batches QAT does not train on (default: :func:`hold_out`'s
    slice of ``data``, which QAT then trains without; under torchrun the same images on every
    rank, so that every rank makes the same choice), and the QAT model is kept only if its loss
    is lower; ``result.check`` records both losses and the choice. ``checkpoints``: the QAT
    loop's, as :func:`qat_finetune`.
    """
    train = functools.partial(qat_finetune, teacher=teacher, checkpoints=checkpoints)
    if options.mode != "qat":
        return quantize_pass.quantize(model, example_input, data, options, calibration=calibration)
    if options.ptq_fallback and check is None and data is not None:
        data, check = hold_out(data, options.calibration_batches)
    # QAT's calibrated ranges and the PTQ model see these same batches
    batches = _take(data if calibration is None else calibration, options.calibration_batches)
    result = quantize_pass.quantize(model, example_input, data, options, train=train, calibration=batches)
    if not options.ptq_fallback:
        return result
    ptq = quantize_pass.quantize(model, example_input, batches, dataclasses.replace(options, mode="ptq"))
    qat_loss, ptq_loss = check_loss(result.graph_module, check), check_loss(ptq.graph_module, check)
    kept = result if qat_loss < ptq_loss else ptq  # a tie keeps the cheaper, simpler model
    check_record = {
        "qat_loss": qat_loss, "ptq_loss": ptq_loss, "images": sum(len(b[1]) for b in check),
        "kept": kept.mode,
        "reason": (f"QAT's INT8 model ends at cross-entropy {qat_loss:.4f} against PTQ's {ptq_loss:.4f} on "
                   f"{len(check)} held-out batches QAT did not train on: "
                   + ("QAT kept" if kept is result
                      else "QAT did not earn its cost here, the PTQ model is kept")),
    }
    if kept is not result:
        log.warning("INT8: %s", check_record["reason"])
    return dataclasses.replace(kept, steps=result.steps, losses=result.losses, check=check_record,
                               seconds=result.seconds + ptq.seconds)


HELD_OUT_FRACTION = 0.1  # of the training data, for QAT's check against PTQ


def hold_out(data: Iterable[Any], batches: int) -> tuple[Iterable[Any], list[tuple[torch.Tensor, ...]]]:
    """``(rest, held_out)``: ``data`` without a slice of its images, and that slice as ``(x, y)``
    batches, for scoring a model on images it was not trained on: a tenth of the images
    (:data:`HELD_OUT_FRACTION`), at most ``batches`` batches, at least one image or batch.

    * a :class:`~ehap_fx.data.CifarLoader`: a fixed random subset of its images (seed 0, the
      same on every rank of a sharded loader), unshuffled and unaugmented; ``rest`` is the same
      loader (shuffle, augmentation, seed, shard) over the other images;
    * a ``DataLoader`` over a map-style dataset: the same, with ``Subset``;
    * a list or tuple of batches: its last batches.

    >>> data = [(torch.zeros(2, 1), torch.tensor([i, i])) for i in range(20)]
    >>> rest, held = hold_out(data, 4)
    >>> len(rest), [int(y[0]) for _, y in held]
    (18, [18, 19])
    """
    from ehap_fx.data import CifarLoader

    if isinstance(data, CifarLoader):
        return _hold_out_cifar(data, batches)
    if isinstance(data, torch.utils.data.DataLoader):
        return _hold_out_dataloader(data, batches)
    if isinstance(data, (list, tuple)):
        if len(data) < 2:
            raise QuantizeError(f"QAT's check against PTQ holds out training batches and {len(data)} batch "
                                "leaves none to train on: pass more batches, check=, or ptq_fallback=False")
        k = max(1, min(batches, int(len(data) * HELD_OUT_FRACTION)))
        return list(data[:-k]), [(b[0], b[1]) for b in data[-k:]]
    raise QuantizeError(
        f"QAT's check against PTQ needs images QAT does not train on, and a {type(data).__name__} cannot "
        "be split: pass a list of batches, an ehap_fx.data CifarLoader or a DataLoader over a map-style "
        "dataset, or check= (held-out batches), or ptq_fallback=False")


def _held_out_indices(n: int, batch_size: int, batches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, held-out) indices of ``n`` items, both sorted; held out: a fixed random subset."""
    if n < 2:
        raise QuantizeError(f"QAT's check against PTQ holds out training images and {n} image leaves none "
                            "to train on: pass more data, check=, or ptq_fallback=False")
    k = max(1, min(batches * batch_size, int(n * HELD_OUT_FRACTION)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    return order[k:].sort().values, order[:k].sort().values


def _hold_out_cifar(loader, batches: int):
    from ehap_fx.data import CifarData, CifarLoader

    d = loader.data
    keep, held = _held_out_indices(len(d), loader.batch_size, batches)

    def subset(idx):
        return CifarData(d.images[idx], d.labels[idx], d.classes, d.name, d.split, d.synthetic, d.root)

    rest = CifarLoader(subset(keep), loader.batch_size, loader.shuffle, loader.augment, loader.seed,
                       loader.drop_last, loader.normalization, rank=loader.rank, world_size=loader.world_size)
    check = CifarLoader(subset(held), loader.batch_size, shuffle=False, augment=False, seed=loader.seed,
                        drop_last=False, normalization=loader.normalization)
    return rest, list(check)


def _hold_out_dataloader(loader, batches: int):
    from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Subset

    if loader.batch_size is None or isinstance(loader.dataset, torch.utils.data.IterableDataset):
        raise QuantizeError("QAT's check against PTQ holds out images of a map-style dataset with a "
                            "batch_size: pass check= (held-out batches) or ptq_fallback=False")
    keep, held = _held_out_indices(len(loader.dataset), loader.batch_size, batches)
    train_set, check_set = Subset(loader.dataset, keep.tolist()), Subset(loader.dataset, held.tolist())
    sampler = loader.sampler
    kw = dict(batch_size=loader.batch_size, drop_last=loader.drop_last, collate_fn=loader.collate_fn,
              num_workers=loader.num_workers)
    if isinstance(sampler, DistributedSampler):
        kw["sampler"] = DistributedSampler(train_set, sampler.num_replicas, sampler.rank, sampler.shuffle,
                                           sampler.seed, sampler.drop_last)
    else:
        kw["shuffle"] = isinstance(sampler, RandomSampler)
    check = DataLoader(check_set, batch_size=loader.batch_size, collate_fn=loader.collate_fn)
    return DataLoader(train_set, **kw), [(b[0], b[1]) for b in check]


def _take(data: Iterable[Any], n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``n`` ``(x, y)`` batches of ``data`` (held in memory, so both models see the same)."""
    out = []
    for batch in data:
        if len(out) == n:
            break
        out.append((batch[0], batch[1]))
    if not out:
        raise QuantizeError("the QAT data yielded no batches for the PTQ check")
    return out


@torch.no_grad()
def check_loss(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean cross-entropy of ``model`` (in eval mode) over ``batches``, per image."""
    total, n = 0.0, 0
    for x, y in batches:
        total += float(F.cross_entropy(model(x), y, reduction="sum"))
        n += len(y)
    return total / n
