"""How to fine-tune: the settings the fine-tuning loop, QAT and the CLI share.

Plain frozen dataclasses with no dependencies, so that the INT8 pass's options
(``passes.quantize.QuantizeOptions.finetune``) can hold one without the passes importing the
training loop (``ehap_fx.train``, which re-exports both names).

>>> FinetuneOptions(epochs=2, distill=DistillOptions(alpha=0.9)).distill.temperature
4.0
>>> DistillOptions(alpha=1.5)
Traceback (most recent call last):
    ...
ValueError: alpha=1.5 must be in [0, 1]: the weight of the teacher's soft targets
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class DistillOptions:
    """Knowledge distillation from a teacher (Hinton, Vinyals, Dean 2015).

    The loss is ``(1 - alpha) · CE(student, y) + alpha · T² · KL(p_T(teacher) ‖ p_T(student))``
    with ``p_T = softmax(logits / T)``: ``T²`` keeps the soft term's gradients on the scale of
    the hard one as ``T`` grows. The teacher runs in eval mode without gradients.

    ``teacher`` says which dense model ``compress`` distils from when it is not handed one:
    ``"finetuned"`` (default) the dense model after the same fine-tune budget, trained first
    (one more fine-tune; it is also the fair baseline, reported as ``dense_finetuned``), or
    ``"given"`` the dense model as given. A given model trained on other data than the
    fine-tune's (e.g. clean CIFAR-10 weights on JPEG-re-encoded images) is a poor teacher: on
    the README's ResNet-56 job it held the student 3 points under the fine-tuned one
    (docs/results.md).

    ``start`` says which weights ``compress`` prunes when it fine-tunes the teacher itself:
    ``"teacher"`` (default) the teacher's, so that the ranking, the plan and the repair work on
    the model already adapted to the fine-tune's data, or ``"given"`` the dense model as given.
    On the README's ResNet-56 job the teacher's start ended 0.72 ± 0.26 pt (fp32) and 0.61 ±
    0.27 pt (INT8) above the given one's, paired per image (docs/results.md). Either way the
    fine-tune budget is the same: the teacher's fine-tune runs in both.
    """

    alpha: float = 0.7
    temperature: float = 4.0
    teacher: str = "finetuned"
    start: str = "teacher"

    def __post_init__(self) -> None:
        if self.teacher not in ("finetuned", "given"):
            raise ValueError(f"teacher={self.teacher!r} must be 'finetuned' or 'given'")
        if self.start not in ("teacher", "given"):
            raise ValueError(f"start={self.start!r} must be 'teacher' (prune the fine-tuned teacher) or "
                             "'given' (prune the dense model as given)")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(
                f"alpha={self.alpha} must be in [0, 1]: the weight of the teacher's soft targets"
            )
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature={self.temperature} must be > 0")


@dataclass(frozen=True)
class FinetuneOptions:
    """Settings of :func:`ehap_fx.train.finetune`; the defaults are the usual CIFAR recipe.

    ``epochs`` may be fractional (0.2 = a fifth of the loader); ``max_steps`` caps the
    number of optimizer steps. ``progress`` shows a tqdm bar. ``distill`` learns from a
    teacher's softened logits as well as the labels (the teacher is passed to ``finetune``;
    ``compress`` passes the dense model).
    """

    epochs: float = 1.0
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    max_steps: int | None = None
    progress: bool = True
    distill: DistillOptions | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.epochs) and self.epochs > 0):
            raise ValueError(f"epochs={self.epochs} must be > 0")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr={self.lr} must be > 0")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum={self.momentum} must be in [0, 1)")
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0; set momentum or nesterov=False")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay} must be >= 0")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={self.label_smoothing} must be in [0, 1)")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps={self.max_steps} must be >= 1 or None")
        if self.distill is not None and not isinstance(self.distill, DistillOptions):
            raise TypeError(f"distill={self.distill!r} must be a DistillOptions or None")
