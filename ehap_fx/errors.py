"""The one error hierarchy of ehap-fx: every error a user can cause derives from EhapError."""


class EhapError(Exception):
    """Base class of all ehap-fx errors that a user can cause and fix."""


class TraceError(EhapError):
    """The model could not be traced into a torch.fx graph."""


class GroupError(EhapError):
    """The channel-group analysis met a graph it cannot describe."""


class ShrinkError(EhapError):
    """A pruning plan cannot be applied to the graph."""


class TargetError(EhapError):
    """A pruning target is invalid or cannot be reached."""


class HessianError(EhapError):
    """The Hessian estimate failed (non-finite loss, no data, no prunable weights)."""


class QuantizeError(EhapError):
    """Quantization or ONNX export failed."""


class DataError(EhapError):
    """A dataset directory or file is missing or malformed."""


class ModelError(EhapError):
    """An unknown model name, or a model that does not fit what was asked of it."""


class WeightsError(ModelError):
    """A checkpoint is missing, unreadable, or does not fit the model's architecture."""


class TrainError(EhapError):
    """Fine-tuning failed (non-finite loss, empty loader)."""


class MemoryBudgetError(HessianError):
    """An estimate would not fit the memory budget, even with its cheapest settings."""


class DistributedError(EhapError):
    """The ranks of a process group disagree, or the group cannot be set up."""


class ArgumentError(EhapError, TypeError):
    """A Python API argument of the wrong kind; the message names the value that fits."""


class OptionError(EhapError, ValueError):
    """A Python API argument of the right kind with a value that does not exist (an unknown
    scorer or capture); the message names the values that fit."""


class ResumeError(EhapError):
    """A checkpoint folder that this run cannot continue (other settings, another version)."""


def reraise_interrupt(error: BaseException) -> None:
    """Raise the KeyboardInterrupt that ``error`` wraps, if any, so that Ctrl-C stays Ctrl-C where
    a library re-raised it as another exception (Python 3.11 turns one that lands in a class
    body's ``__set_name__``, e.g. while torch.ao imports its dataclasses, into a RuntimeError).
    Call it first in every ``except Exception`` that turns a library's failure into an EhapError."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            raise error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
