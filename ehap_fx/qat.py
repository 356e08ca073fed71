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
from ehap_fx.errors import QuantizeError
from ehap_fx.passes import quantize as quantize_pass
from ehap_fx.passes.quantize import QuantizeOptions, QuantizeResult, quiet_quantization_warnings
from ehap_fx.train import FinetuneResult, finetune, total_steps

log = logging.getLogger("ehap_fx")


class _FreezingLoader:
    """Yields the batches of ``loader``; runs ``actions[step]`` before handing out that step."""

    def __init__(self, loader: Iterable[Any], actions: dict[int, list[Callable[[], None]]]):
        self.loader, self.actions, self.step = loader, actions, 0

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
    prepared: nn.Module, loader: Iterable[Any], options: QuantizeOptions, teacher: nn.Module | None = None
) -> FinetuneResult:
    """Fine-tune a prepared QAT graph in place with ``options.finetune`` (distilling from
    ``teacher`` when ``options.finetune.distill`` is set), freezing BN statistics and then the
    observers at the steps ``options`` says."""
    uncalibrated = [n for n, m in quantize_pass.histogram_quantizers(prepared) if m.observer_enabled[0]]
    if uncalibrated:
        raise QuantizeError(
            f"{len(uncalibrated)} activation quantizers (e.g. {uncalibrated[0]}) wait for calibrated ranges: "
            "run passes.quantize.calibrate_ranges(prepared, batches, n) first "
            "(passes.quantize.quantize does), "
            "or prepare with QuantizeOptions(qat_ranges='moving')"
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
    with quiet_quantization_warnings():
        return finetune(prepared, _FreezingLoader(loader, actions), ft,
                        teacher=teacher if ft.distill is not None else None)


def quantize(
    model: nn.Module,
    example_input: torch.Tensor,
    data: Iterable[Any] | None,
    options: QuantizeOptions = QuantizeOptions(),
    *,
    teacher: nn.Module | None = None,
    calibration: Iterable[Any] | None = None,
) -> QuantizeResult:
    """``passes.quantize.quantize`` with :func:`qat_finetune` as its QAT loop (PTQ: the same);
    ``teacher`` is distilled from when ``options.finetune.distill`` is set.

    QAT's activation ranges are calibrated (``options.qat_ranges``) on the first
    ``calibration_batches`` batches of ``calibration`` (default ``data``), so QAT starts from
    the PTQ model of those batches. With ``options.ptq_fallback`` (the default) it earns its
    cost or is dropped: that PTQ model is made as well, both INT8 models are scored by
    cross-entropy on the same batches (under
    torchrun pass batches every rank shares, so that every rank makes the same choice), and the
    QAT model is kept only if its loss is not higher; ``result.check`` records both losses and
    the choice.
    """
    train = functools.partial(qat_finetune, teacher=teacher)
    if options.mode != "qat":
        return quantize_pass.quantize(model, example_input, data, options, calibration=calibration)
    # QAT's calibrated ranges, the PTQ model and the check all see these same batches
    batches = _take(data if calibration is None else calibration, options.calibration_batches)
    result = quantize_pass.quantize(model, example_input, data, options, train=train, calibration=batches)
    if not options.ptq_fallback:
        return result
    ptq = quantize_pass.quantize(model, example_input, batches, dataclasses.replace(options, mode="ptq"))
    qat_loss, ptq_loss = check_loss(result.graph_module, batches), check_loss(ptq.graph_module, batches)
    kept = result if qat_loss <= ptq_loss else ptq
    check = {
        "qat_loss": qat_loss, "ptq_loss": ptq_loss, "images": sum(len(b[1]) for b in batches),
        "kept": kept.mode,
        "reason": (f"QAT's INT8 model ends at cross-entropy {qat_loss:.4f} against PTQ's {ptq_loss:.4f} on "
                   f"the same {len(batches)} training batches: "
                   + ("QAT kept" if kept is result
                      else "QAT did not earn its cost here, the PTQ model is kept")),
    }
    if kept is not result:
        log.warning("INT8: %s", check["reason"])
    return dataclasses.replace(kept, steps=result.steps, losses=result.losses, check=check,
                               seconds=result.seconds + ptq.seconds)


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
