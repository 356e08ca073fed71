"""compress(): the whole EHAP pipeline as a recipe on one screen.

    capture → teachers → prune (rank → plan → shrink, × target.steps) → repair → fine-tune
            → INT8 (PTQ or QAT) → ONNX export, verified in onnxruntime → bench

Each step is a function of ``ehap_fx.steps`` over the passes in ``ehap_fx.passes`` (each usable
alone on a ``GraphModule``) and returns what it did; :func:`compress` only chains them, and the
report is built once from their results (``ehap_fx.compress_report``). Its arguments are checked
at the edge: the options where they are typed (:class:`CompressOptions`), the data in
``ehap_fx.edge``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from ehap_fx import compress_report, edge, steps
from ehap_fx.checkpoint import Checkpoints, source_hash, weights_hash
from ehap_fx.compress_report import CompressReport, GroupRecord
from ehap_fx.errors import ArgumentError, EhapError, OptionError, TargetError
from ehap_fx.latency import BenchOptions, LatencyOptions
from ehap_fx.latency_loop import LoopOptions
from ehap_fx.passes.compensate import CompensateOptions
from ehap_fx.passes.coupling import Rules
from ehap_fx.passes.quantize import QAT_FINETUNE, QuantizeOptions
from ehap_fx.passes.trace import CAPTURES
from ehap_fx.scoring import SCORERS, HessianOptions
from ehap_fx.steps import Pruned, PruneStep, prune
from ehap_fx.target import DEFAULT_ROUND_TO, Target
from ehap_fx.train import DistillOptions, FinetuneOptions

__all__ = ["RECIPE", "CompressOptions", "CompressReport", "CompressResult", "GroupRecord", "PruneStep",
           "Pruned", "Recipe", "compress", "prune"]


@dataclass(frozen=True)
class Recipe:
    """The default recipe: what ``compress()`` and ``ehap compress`` do where they are not told
    otherwise, one value for both. Chosen from the accuracy–latency front (docs/results.md,
    "Accuracy at speed"): the ranking (``scorer``, with data), what may go (``granularity``,
    ``round_to``), distillation from the dense model during fine-tuning and QAT (``distill``)
    and the INT8 mode (``quant_mode``): PTQ. On the README's ResNet-56 job QAT (391 steps,
    starting from the PTQ model) ties PTQ (−0.02 and −0.08 pt, ±0.12, two seeds) at 15–29× its
    cost, and a QAT learning rate ten times higher loses 0.42 pt; ``quant_mode="qat"`` still
    runs it, kept only if it beats PTQ on held-out training images (``ptq_fallback``).

    ``compress()`` trains only when asked (it is a graph pass first): its ``target`` and
    ``scorer`` defaults are the recipe's, and ``finetune_options=RECIPE.finetune(epochs)``,
    ``quantize=RECIPE.quantize()`` give it the CLI's training half.

    >>> RECIPE.target(latency=0.5).granularity == RECIPE.granularity
    True
    """

    scorer: str = "removal"
    granularity: str = "both"
    round_to: int = DEFAULT_ROUND_TO
    distill: DistillOptions | None = DistillOptions()
    quant_mode: str = "ptq"

    def target(self, **fraction: float) -> Target:
        """``Target`` of the given fraction (default ``macs=0.5``) with the recipe's granularity
        and rounding."""
        return Target(**(fraction or {"macs": 0.5}), granularity=self.granularity, round_to=self.round_to)

    def finetune(self, epochs: float = 1.0, **options: Any) -> FinetuneOptions:
        """The fine-tune of ``epochs``, distilled as the recipe says (``options``: the rest)."""
        return FinetuneOptions(epochs=epochs, **{"distill": self.distill, **options})

    def quantize(self, **options: Any) -> QuantizeOptions:
        """INT8 in the recipe's mode; QAT's loop distilled as the recipe says."""
        return QuantizeOptions(mode=self.quant_mode, finetune=replace(QAT_FINETUNE, distill=self.distill),
                               **options)


#: The one default recipe (see :class:`Recipe`).
RECIPE = Recipe()


@dataclass(frozen=True)
class CompressOptions:
    """What :func:`compress` does, as one typed value; its keyword arguments of these names build
    one (the CLI builds it from its flags and a preset, ``ehap_fx.cli.PRESETS``, and calls
    ``compress(model, x, data=..., **vars(options))``). Checked and normalised when made.

    ``target``: a :class:`~ehap_fx.target.Target`, or a float (the fraction of the MACs kept,
    ``RECIPE.target(macs=...)``); default ``RECIPE.target()`` (0.5 of the MACs, the recipe's
    granularity and rounding). A latency target measures a per-conv onnxruntime table
    (``latency`` options, cached on disk).

    ``scorer``: ``"hessian"`` (the paper's per-channel trace sensitivity, ``hessian`` options),
    ``"removal"`` (``ehap_fx.scoring.removal``: the exact Gauss-Newton loss increase of removing
    each channel, ranked per unit of cost saved; same precision/batch options) or ``"l1"``
    (default None: :data:`RECIPE`'s, ``"removal"``, with data, as the CLI; ``"hessian"`` with data
    and a ``loss_fn``; ``"l1"`` without data).

    ``finetune_options``: training happens only when asked: ``RECIPE.finetune(1)`` and
    ``quantize=RECIPE.quantize()`` are the CLI's (distilled, QAT kept only if it beats PTQ).
    Distillation: when ``finetune_options.distill`` (or ``quantize.finetune.distill``) is set,
    fine-tuning (and QAT) also learn from the teacher's softened logits — by default
    (``DistillOptions.teacher="finetuned"``) the dense model fine-tuned first with the same
    ``finetune_options`` from the labels alone (``report.accuracy["dense_finetuned"]``: the
    baseline at equal budget), or the dense model as given (``teacher="given"``, or without a
    fine-tune). A teacher fine-tuned here is also what gets ranked and pruned
    (``DistillOptions.start``, default ``"teacher"``; ``report.target["pruned_from"]``).

    ``quantize``: a ``passes.quantize.QuantizeOptions`` (True: ``RECIPE.quantize()``, PTQ; None or
    False: stay fp32); ``export`` an ONNX path (needs ``quantize``).

    ``exclude``, ``leaf_modules``: modules left alone / not traced into (``passes.trace``).
    ``capture``: ``"auto"`` (default: FX, else torch.export, and export where it keeps more
    channels prunable than a partial FX graph; ``report.capture`` says which ran and why,
    ``passes.capture``), ``"fx"`` (symbolic_trace) or ``"export"`` (an ATen graph;
    ``passes.program.exported_program(result.pruned)`` is the pruned ``ExportedProgram``).

    ``bench`` (with ``export``; True: the defaults): time the dense fp32 model and the INT8 file
    in onnxruntime on this machine (``report.latency``: milliseconds per batch size, the speed-up).

    ``latency_loop`` (with a latency target): measure the plan, not only predict it — export
    the candidate and the dense model to INT8 ONNX, time them interleaved and correct the plan
    until the measured ratio meets the target (``ehap_fx.latency_loop.deliver``;
    ``report.latency_loop``: rounds, predicted and measured ratios per batch, noise, or why the
    loop stopped, e.g. a machine too noisy to decide).

    ``rules``: coupling rules for modules of your own, added to the default ones
    (``passes.coupling``): ``Rules(modules={MyAct: same_channels})``.

    ``checkpoints``: a :class:`~ehap_fx.checkpoint.Checkpoints` folder where each expensive step
    (the teacher, the ranking and plans, the repair, the fine-tune) saves its result; the same
    call again reads the finished steps instead of recomputing them and ends with the outputs
    of an uninterrupted run. A folder of other options, weights or ehap-fx source is refused
    (``ResumeError``). ``Checkpoints(folder, every=N)`` also saves a fine-tune every N steps.

    ``compensate`` (with data; None turns it off): after pruning, refit the surviving weights
    layer by layer to reproduce the activations of the model pruning started from (the
    fine-tuned teacher when ``compress`` trains one and ``DistillOptions.start="teacher"``, the
    default; else the dense model as given) on ``compensate.images`` inputs of the data
    (``passes.compensate``; no labels read). Without ``finetune_options`` that is the
    post-training recipe; with it, the fine-tune starts from the repaired model.
    ``report.accuracy["pruned"]`` is the top-1 before the repair, ``["compensated"]`` after.
    """

    target: Target = RECIPE.target()
    scorer: str | None = None
    hessian: HessianOptions = HessianOptions()
    finetune_options: FinetuneOptions | None = None
    quantize: QuantizeOptions | None = None
    export: str | Path | None = None
    exclude: Sequence[str] = ()
    leaf_modules: Sequence[str | type[nn.Module]] = ()
    latency: LatencyOptions | None = None
    capture: str = "auto"
    bench: BenchOptions | None = None
    latency_loop: LoopOptions | None = None
    compensate: CompensateOptions | None = CompensateOptions()
    rules: Rules | None = None
    checkpoints: Checkpoints | None = None

    def __post_init__(self) -> None:
        """The shorthands read (a float target, ``quantize``/``bench``/``finetune_options`` as
        True/False); anything else of the wrong kind refused, naming what fits."""
        self._read_shorthands()
        self._check_kinds()
        self._check_values()

    def _read_shorthands(self) -> None:
        target = self.target
        if isinstance(target, (int, float)) and not isinstance(target, bool):
            try:
                object.__setattr__(self, "target", RECIPE.target(macs=float(target)))
            except ValueError as e:
                raise TargetError(f"target={target!r}, a fraction of the MACs to keep: {e}") from e
        for name, on, off in (("quantize", RECIPE.quantize, None), ("bench", BenchOptions, None),
                              ("finetune_options", None, None)):
            value = getattr(self, name)
            if value is True and on is not None:
                object.__setattr__(self, name, on())
            elif value is False:
                object.__setattr__(self, name, off)

    def _check_kinds(self) -> None:
        for name, kind, fix in (
            ("target", Target, "Target(macs=0.5), RECIPE.target(latency=0.5) or a float (MACs kept)"),
            ("quantize", QuantizeOptions, "RECIPE.quantize() (PTQ), QuantizeOptions(), True or None"),
            ("finetune_options", FinetuneOptions, "RECIPE.finetune(epochs=1) or None"),
            ("hessian", HessianOptions, "HessianOptions(...)"),
            ("latency", LatencyOptions, "LatencyOptions(...) or None"),
            ("bench", BenchOptions, "BenchOptions(...), True or None"),
            ("export", (str, Path), "a path such as 'out/model_int8.onnx', or None"),
            ("rules", Rules, "passes.coupling.Rules(modules={MyModule: same_channels}) or None"),
            ("checkpoints", Checkpoints, "ehap_fx.checkpoint.Checkpoints('folder') or None"),
        ):
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                raise ArgumentError(f"compress({name}={value!r:.60}): expected {fix}")
        if self.target is None:
            raise ArgumentError("compress(target=None): expected Target(macs=0.5), RECIPE.target(...) or a "
                                "float")

    def _check_values(self) -> None:
        if self.scorer is not None and self.scorer not in SCORERS:
            raise OptionError(f"compress(scorer={self.scorer!r:.60}): expected one of {SCORERS} or None (the "
                              "recipe)")
        if self.capture not in CAPTURES:
            raise OptionError(f"compress(capture={self.capture!r:.60}): expected one of {CAPTURES}")
        for name, ok, fix in (
            ("compensate", isinstance(self.compensate, CompensateOptions), "CompensateOptions(...) or None"),
            ("latency_loop", isinstance(self.latency_loop, LoopOptions), "LoopOptions(...) or None"),
            ("exclude", _names(self.exclude), "a list of module names such as ['fc']"),
            ("leaf_modules", _names(self.leaf_modules, types=(str, type)),
             "a list of module names or nn.Module classes"),
        ):
            if getattr(self, name) is not None and not ok:
                raise ArgumentError(f"compress({name}={getattr(self, name)!r:.60}): expected {fix}")
        if self.export is not None and self.quantize is None:
            raise EhapError("export= writes the INT8 model: also pass quantize=RECIPE.quantize() (PTQ) or "
                            "True")


def _identity(model: nn.Module, o: CompressOptions, run) -> dict:
    """What a run's checkpoints belong to: the code, the model's weights, the data, the options
    (but where the checkpoints and the ONNX file go, and progress bars)."""
    options = steps.plain(replace(o, checkpoints=None, export=None, rules=None))
    return {"ehap_fx": source_hash(), "weights": weights_hash(model), "data": run.name,
            "rules": None if o.rules is None else sorted(
                f"{getattr(k, '__module__', '')}.{getattr(k, '__qualname__', k)}"
                for k in (*o.rules.functions, *o.rules.modules)),
            **{f"options.{k}": v for k, v in _without(options, "progress").items()}}


def _without(value, key: str):
    if isinstance(value, dict):
        return {k: _without(v, key) for k, v in value.items() if k != key}
    return [_without(v, key) for v in value] if isinstance(value, list) else value


def _names(value, types: tuple = (str,)) -> bool:
    """A list or tuple of names (not one string, which would be read letter by letter)."""
    return isinstance(value, (list, tuple, set)) and all(isinstance(v, types) for v in value)


@dataclass
class CompressResult:
    """The pruned ``GraphModule``, the INT8 model and ONNX file when asked for, the report, and the
    teacher distilled from (e.g. to distil a later QAT from the same model)."""

    pruned: fx.GraphModule
    report: CompressReport
    quantized: nn.Module | None = None
    onnx_path: Path | None = None
    teacher: nn.Module | None = None  # the frozen model distilled from, when distilling


def compress(
    model: nn.Module,
    example_input: torch.Tensor | tuple | dict,
    *,
    data: Iterable | None = None,
    eval_data: Iterable | None = None,
    loss_fn: Callable | None = None,
    teacher: nn.Module | None = None,
    data_name: str | None = None,
    **options: Any,
) -> CompressResult:
    """Prune ``model`` to a target by Hessian-aware channel ranking, repair it from ``data``, and
    optionally fine-tune, quantize to INT8 and export to ONNX; the input model is not modified.

    ``example_input`` is one input tensor, a tuple of positional inputs or a dict of keyword
    inputs; the outputs (a tensor, or tuples/dicts of them) keep their shapes. ``data`` yields
    ``(x, y)`` batches (e.g. ``ehap_fx.data.load_cifar(...).loader(128)``) or inputs alone (the
    ranking then draws its labels from the model's own softmax; fine-tuning needs labels);
    without it the ranking is L1 (one warning says so). ``loss_fn(output, y)`` (a scalar) says how
    to score outputs that are not class logits; ``eval_data`` adds top-1 at each stage;
    ``teacher`` replaces the default one distilled from. ``options``: the fields of
    :class:`CompressOptions` (``target``, ``scorer``, ``quantize``, ``export``, ...), read there.
    """
    o = CompressOptions(**options) if set(options) <= _OPTION_NAMES else _unknown(options)
    run = edge.inputs(model, example_input, data, eval_data, loss_fn, data_name, o, RECIPE.scorer, teacher)
    if o.checkpoints is not None:  # a folder of another run is refused before any work
        o.checkpoints.check("compress", _identity(model, o, run))
    top1 = steps.top1_on(eval_data)
    captured = steps.capture(model, example_input, o, top1)
    dense = captured.graph_module  # pruning and the repair copy it: it stays the dense graph
    taught = steps.teachers(dense, teacher, o, run, top1)
    source = taught.pruned_from(dense)  # the fine-tuned teacher by default, when one was trained
    shrunk = steps.prune_to_target(source, example_input, run, o, taught.teacher, top1)
    repaired = steps.repair(shrunk.graph_module, source if run.images is not None else None, run, o, top1)
    gm = repaired.graph_module
    tuned = steps.tune(gm, run, o, taught.teacher, top1)
    quantized = steps.quantize_and_export(gm, example_input, run, o, taught.teacher, top1)
    timed = steps.bench(taught.dense, example_input, quantized, o.bench)
    report = compress_report.build(run, o, captured, taught, shrunk, repaired, tuned, quantized, timed)
    return CompressResult(gm, report, quantized.model, quantized.onnx_path, taught.teacher)


_OPTION_NAMES = frozenset(f.name for f in fields(CompressOptions))
# help(compress) and editors show the options as keyword arguments, with their defaults
compress.__signature__ = inspect.signature(compress).replace(parameters=[
    *list(inspect.signature(compress).parameters.values())[:-1],
    *(p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
      for p in inspect.signature(CompressOptions).parameters.values())])


def _unknown(options: dict) -> CompressOptions:
    import difflib

    bad = sorted(set(options) - _OPTION_NAMES)
    near = {b: difflib.get_close_matches(b, _OPTION_NAMES | {"data", "eval_data", "loss_fn", "teacher",
                                                             "data_name"}, 1) for b in bad}
    hints = "; ".join(f"{b!r}" + (f" (did you mean {n[0]!r}?)" if n else "") for b, n in near.items())
    raise ArgumentError(f"compress() got unknown keyword arguments: {hints}; the options are "
                        f"{', '.join(sorted(_OPTION_NAMES))}")
