"""The standard fine-tuning loop, shared by compress(), QAT and the CLI.

SGD with Nesterov momentum, a cosine learning-rate schedule from ``lr`` to 0 over all steps,
cross-entropy (optional label smoothing), a tqdm progress bar and per-epoch evaluation. It
works on any ``nn.Module`` mapping a batch ``x`` to logits (an FX ``GraphModule`` included)
and on any iterable of ``(x, y)`` batches with a ``len()``; batches are moved to the device
of the model's parameters.

>>> from ehap_fx.data import synthetic_cifar
>>> from ehap_fx.models import get_model
>>> data = synthetic_cifar(64, seed=0)
>>> model = get_model("resnet20")
>>> result = finetune(model, data.loader(32, shuffle=True),
...                   FinetuneOptions(epochs=0.5, progress=False))
>>> result.steps, len(result.losses)
(1, 1)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ehap_fx.checkpoint import Checkpoints, rng_state, set_rng_state
from ehap_fx.distributed import data_parallel
from ehap_fx.errors import TrainError
from ehap_fx.process_group import global_mean, is_main
from ehap_fx.progress import bar as tqdm
from ehap_fx.train_options import DistillOptions, FinetuneOptions

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class EpochReport:
    """What one (possibly partial) epoch did: mean training loss, top-1 % when evaluated."""

    epoch: int
    steps: int
    train_loss: float
    eval_top1: float | None
    lr: float


@dataclass(frozen=True)
class FinetuneResult:
    """The whole run: per-step losses, per-epoch reports, wall-clock seconds."""

    steps: int
    losses: tuple[float, ...]
    epochs: tuple[EpochReport, ...]
    seconds: float

    @property
    def final_top1(self) -> float | None:
        """Top-1 % after the last epoch, when an eval loader was given."""
        return self.epochs[-1].eval_top1 if self.epochs else None


Callback = Callable[[nn.Module, EpochReport], None]


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (or buffer); CPU for a stateless model."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def total_steps(loader: Batches, options: FinetuneOptions) -> int:
    """Number of optimizer steps: ``ceil(epochs * len(loader))``, capped by ``max_steps``."""
    n = len(loader)  # type: ignore[arg-type]
    if n == 0:
        raise TrainError("the training loader yields no batches; check its size and drop_last")
    steps = max(1, math.ceil(round(options.epochs * n, 6)))  # 1.1 * 50 = 55.00000000000001
    return steps if options.max_steps is None else min(steps, options.max_steps)


def finetune(
    model: nn.Module,
    train_loader: Batches,
    options: FinetuneOptions = FinetuneOptions(),
    eval_loader: Batches | None = None,
    callback: Callback | None = None,
    teacher: nn.Module | None = None,
    checkpoints: Checkpoints | None = None,
    name: str = "finetune",
) -> FinetuneResult:
    """Fine-tune ``model`` in place; returns per-step losses and per-epoch reports.

    Evaluates top-1 on ``eval_loader`` after each epoch (and after a final partial one) and
    then calls ``callback(model, report)``. With ``options.distill`` the loss also matches
    ``teacher``'s softened logits (:func:`distillation_loss`; the teacher runs in eval mode,
    without gradients, and gets its mode back afterwards). Leaves the model in eval mode.
    Raises :class:`TrainError` on a non-finite loss, naming the step and the learning rate.

    ``checkpoints`` with ``every``: saves ``NAME.loop.pt`` every ``every`` steps (the model, the
    optimizer, the schedule, the losses and reports so far, the data position: the random streams
    at the start of the epoch and the batches drawn since, and the streams now) and starts from
    it when it is there, ending with the weights of a run that never stopped.
    """
    if (options.distill is None) != (teacher is None):
        raise TrainError(
            "distillation needs both FinetuneOptions(distill=DistillOptions()) and "
            f"finetune(..., teacher=model): got distill={options.distill}, "
            f"teacher={type(teacher).__name__ if teacher is not None else None}"
        )
    steps = total_steps(train_loader, options)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainError(f"{type(model).__name__} has no trainable parameters to fine-tune")
    optimizer = torch.optim.SGD(params, lr=options.lr, momentum=options.momentum,
                                nesterov=options.nesterov, weight_decay=options.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=0.0)
    criterion = Objective(options, teacher)
    device = model_device(model)
    losses: list[float] = []
    reports: list[EpochReport] = []
    start = time.perf_counter()
    show = options.progress and is_main()  # under torchrun: rank 0 only
    bar = tqdm(total=steps, desc="finetune", unit="step", disable=not show)
    every = checkpoints.every if checkpoints is not None else None
    saved = checkpoints.load(f"{name}.loop") if every is not None else None
    if saved is not None:  # where a stopped run left off
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        losses, reports = list(saved["losses"]), list(saved["reports"])
        bar.update(len(losses) + len(saved["epoch_losses"]))
    with bar, data_parallel(model) as net, criterion:  # DDP inside a torch.distributed process group
        while len(losses) < steps:
            net.train()
            at_start = rng_state([train_loader]) if saved is None else saved["epoch_rng"]
            drawn = [] if saved is None else list(saved["epoch_losses"])
            if saved is not None:
                set_rng_state(saved["epoch_rng"], [train_loader])

            def save(done: int, epoch_losses: list[float], at_start=at_start) -> None:
                if every is not None and done % every == 0 and done < steps:
                    checkpoints.save(f"{name}.loop", {
                        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict(), "losses": losses, "reports": reports,
                        "epoch_losses": epoch_losses, "epoch_rng": at_start, "rng": rng_state()})

            epoch_losses = _run_epoch(net, train_loader, optimizer, schedule, criterion, device,
                                      steps - len(losses), len(losses), bar, drawn=drawn,
                                      after=saved["rng"] if saved is not None else None, save=save)
            saved = None
            losses.extend(epoch_losses)
            top1 = evaluate(model, eval_loader) if eval_loader is not None else None
            report = EpochReport(len(reports), len(losses), sum(epoch_losses) / len(epoch_losses),
                                 top1, optimizer.param_groups[0]["lr"])
            reports.append(report)
            if top1 is not None and show:
                bar.write(f"epoch {report.epoch}: train loss {report.train_loss:.4f}, "
                          f"eval top-1 {top1:.2f}%")
            if callback is not None:
                callback(model, report)
    model.eval()
    return FinetuneResult(len(losses), tuple(losses), tuple(reports), time.perf_counter() - start)


def distillation_loss(
    logits: torch.Tensor, soft: torch.Tensor, hard: torch.Tensor, options: DistillOptions
) -> torch.Tensor:
    """The distillation term: ``alpha · T² · KL(softmax(soft/T) ‖ softmax(logits/T))`` plus
    ``(1 - alpha)`` times the cross-entropy ``hard`` (a scalar) — see :class:`DistillOptions`.

    >>> z = torch.tensor([[2.0, 0.0, -1.0]])
    >>> float(distillation_loss(z, z, torch.tensor(0.5), DistillOptions(alpha=0.5)))  # KL(p‖p) = 0
    0.25
    """
    t = options.temperature
    kl = F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(soft / t, dim=1),
                  reduction="batchmean", log_target=True)
    return (1.0 - options.alpha) * hard + options.alpha * t * t * kl


class Objective:
    """The loss of one training batch: cross-entropy (optional label smoothing), blended with
    the teacher's soft targets when ``options.distill`` is set. A context manager: inside it
    the teacher is in eval mode; its mode comes back on exit."""

    def __init__(self, options: FinetuneOptions, teacher: nn.Module | None = None):
        self.ce = nn.CrossEntropyLoss(label_smoothing=options.label_smoothing)
        self.distill, self.teacher = options.distill, teacher
        self._was_training = False

    def __enter__(self) -> Objective:
        if self.teacher is not None:
            self._was_training = self.teacher.training
            self.teacher.eval()
        return self

    def __exit__(self, *exc) -> None:
        if self.teacher is not None:
            self.teacher.train(self._was_training)

    def __call__(self, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        hard = self.ce(logits, y)
        if self.distill is None:
            return hard
        with torch.no_grad():
            soft = self.teacher(x.to(model_device(self.teacher))).to(logits.device)  # (N, classes)
        if soft.shape != logits.shape:
            raise TrainError(
                f"the teacher's output {tuple(soft.shape)} does not match the student's "
                f"{tuple(logits.shape)}: distillation needs the same classes"
            )
        return distillation_loss(logits, soft.float(), hard, self.distill)


def _run_epoch(model, loader, optimizer, schedule, criterion, device, budget, done, bar, *,
               drawn: list[float] = (), after: dict | None = None, save=None):
    """At most ``budget`` steps over one pass of ``loader``; returns their losses. A resumed
    epoch passes the losses of the steps it had ``drawn`` (their batches are drawn again and
    skipped) and the random streams ``after`` them; ``save(step, losses)`` after each step."""
    losses: list[float] = list(drawn)
    for i, (x, y) in enumerate(loader):
        if i < len(drawn):
            continue
        if after is not None:
            set_rng_state(after)
            after = None
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = criterion(model(x), x, y)
        value = global_mean(loss)  # loss.item(), averaged over the ranks under DDP
        if not math.isfinite(value):
            raise TrainError(
                f"non-finite loss {value} at step {done + len(losses)} "
                f"(lr={optimizer.param_groups[0]['lr']:.3g}); lower the learning rate or "
                "check the model and the input normalisation"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(value)
        bar.set_postfix(loss=f"{value:.4f}", refresh=False)  # shown by the update
        bar.update(1)
        if save is not None:
            save(done + len(losses), losses)
        if len(losses) == budget:
            break
    if after is not None:  # every batch of the epoch had been drawn before the stop
        set_rng_state(after)
    if not losses:
        raise TrainError("the training loader yielded no batches in an epoch")
    return losses


@torch.no_grad()
def evaluate(model: nn.Module, loader: Batches) -> float:
    """Top-1 accuracy in percent (0-100) of ``model`` over ``loader``, in eval mode.

    The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    device = model_device(model)
    correct = total = 0
    try:
        for x, y in loader:
            logits = model(x.to(device))
            correct += int((logits.argmax(1) == y.to(device)).sum())
            total += y.shape[0]
    finally:
        model.train(was_training)
    if total == 0:
        raise TrainError("the evaluation loader yielded no batches")
    return 100.0 * correct / total


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: Batches, batches: int = 50) -> int:
    """Re-estimate every BatchNorm's running statistics from ``batches`` batches.

    Resets the running mean/var, forwards in train mode without gradients using a cumulative
    average (``momentum=None``), then restores each BN's momentum and the model's mode.
    Useful after pruning or weight changes. Returns the number of images seen.
    """
    if batches < 1:
        raise ValueError(f"batches={batches} must be >= 1")
    norms = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    was_training = model.training
    device = model_device(model)
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    seen = 0
    model.train()
    try:
        for i, (x, _) in enumerate(loader):
            if i == batches:
                break
            model(x.to(device))
            seen += x.shape[0]
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    if seen == 0:
        raise TrainError("recalibrate_bn: the loader yielded no batches")
    return seen
