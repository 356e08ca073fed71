"""``--model`` specs for users' own classifiers: a model library's name, a file, a module.

=============================  ===============================================================
spec                           what is built
=============================  ===============================================================
``resnet56``, ``wrn-28-8``     the paper's CIFAR models (:func:`ehap_fx.models.get_model`)
``torchvision:NAME``           ``torchvision.models.get_model(NAME, num_classes=...)``
``timm:NAME``                  ``timm.create_model(NAME, num_classes=...)`` (timm installed)
``path/to/file.py:factory``    ``factory(num_classes=...)`` (or ``factory()``) from that file
``package.module:attr``        the same, imported from ``PYTHONPATH``
=============================  ===============================================================

``weights`` is a file (a state dict, or a training checkpoint holding one under
``state_dict``/``model``/``model_state_dict``; read with ``weights_only=True``) or, for the
libraries, a pretrained tag (``DEFAULT``, ``IMAGENET1K_V1`` for torchvision; ``pretrained`` or a
timm tag such as ``a1_in1k``) taken from the library's local cache and never downloaded: a
tag that is not cached is an error naming the file and how to fetch it once. Pretrained heads
whose class count differs from ``num_classes`` are replaced by a fresh one of ``num_classes``
(the usual start of fine-tuning a pretrained model on one's own classes), and the report says so.

The normalisation and input size come from the library when it knows them (torchvision weights'
``transforms()``, timm's ``pretrained_cfg``), else they are ``None`` and the caller decides.

>>> r = resolve_model("resnet20", 10)
>>> r.library, type(r.model).__name__, r.normalization is None
('ehap', 'CifarResNet', True)
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ehap_fx.data import Normalization
from ehap_fx.errors import ModelError, WeightsError
from ehap_fx.models import get_model, load_pretrained
from ehap_fx.models.resnet_cifar import _mismatch_message

log = logging.getLogger("ehap_fx")

LIBRARIES = ("torchvision", "timm")
_STATE_KEYS = ("state_dict", "model", "model_state_dict", "state_dict_ema", "model_ema")


@dataclass(frozen=True)
class ResolvedModel:
    """A built model and what its library says about its inputs.

    ``library``: ``"ehap"``, ``"torchvision"``, ``"timm"``, ``"file"`` or ``"module"``;
    ``weights``: what was loaded (a path or ``"torchvision:IMAGENET1K_V1"``), None for none;
    ``head``: a note when a pretrained head was replaced for ``num_classes``."""

    model: nn.Module
    spec: str
    library: str
    normalization: Normalization | None = None
    input_size: int | None = None
    weights: str | None = None
    head: str | None = None


def library_of(spec: str) -> str:
    """Which kind of spec ``spec`` is (see the module docstring).

    >>> [library_of(s) for s in ("resnet56", "torchvision:resnet18", "timm:resnet18", "a/b.py:net", "m:C")]
    ['ehap', 'torchvision', 'timm', 'file', 'module']
    """
    head, sep, _ = spec.partition(":")
    if not sep:
        return "ehap"
    if head in LIBRARIES:
        return head
    return "file" if spec.rpartition(":")[0].endswith(".py") else "module"


def resolve_model(spec: str, num_classes: int, weights: str | Path | None = None) -> ResolvedModel:
    """Build ``spec`` for ``num_classes`` and load ``weights`` (a file or a library tag), in
    eval mode. Raises :class:`ModelError` / :class:`WeightsError` naming the fix."""
    library = library_of(spec)
    weights_file = _weights_file(weights, library)
    if library == "ehap":
        model = get_model(spec, num_classes)
        if weights_file is not None:
            load_pretrained(model, weights_file)
        return ResolvedModel(model.eval(), spec, library, weights=_name(weights_file))
    name = spec.partition(":")[2]
    if library == "torchvision":
        return _torchvision(spec, name, num_classes, weights_file, weights)
    if library == "timm":
        return _timm(spec, name, num_classes, weights_file, weights)
    model = _call_factory(spec, _factory(spec, library), num_classes)
    if weights_file is not None:
        load_weights(model, weights_file)
    return ResolvedModel(model.eval(), spec, library, weights=_name(weights_file))


def _name(path: Path | None) -> str | None:
    return str(path) if path is not None else None


def _weights_file(weights, library: str) -> Path | None:
    """``weights`` as a file, None for none or a library tag; a path that is not there is an error."""
    if weights is None:
        return None
    path = Path(weights).expanduser()
    if path.is_file():
        return path
    looks_like_tag = library in LIBRARIES and path.suffix == "" and len(path.parts) == 1
    if looks_like_tag:
        return None
    hint = "" if library in LIBRARIES else " (pretrained tags such as DEFAULT: torchvision:/timm: models)"
    raise WeightsError(f"--weights {str(weights)!r} does not exist or is not a file{hint}")


# ---------------------------------------------------------------------------------------------
# Weights files
# ---------------------------------------------------------------------------------------------


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in ``path``: a plain one or one held under a training checkpoint's key
    (``state_dict``, ``model``, ...), ``module.``/``_orig_mod.`` prefixes stripped; read with
    ``weights_only=True`` (no code in the file runs)."""
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # a pickled whole model, or not a torch file at all
        raise WeightsError(
            f"cannot read {str(path)!r} with torch.load(weights_only=True) ({type(e).__name__}); save "
            "model.state_dict() (or a checkpoint dict holding it under 'state_dict') instead of the "
            "whole model"
        ) from e
    for key in _STATE_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise WeightsError(f"{str(path)!r} holds no state dict of tensors (looked under "
                           f"{', '.join(_STATE_KEYS)} too)")
    out = {}
    for key, value in obj.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def load_weights(model: nn.Module, path: Path) -> str | None:
    """Load ``path`` into ``model`` strictly, except a classifier head whose shape alone differs
    (a checkpoint of another class count), which keeps its fresh initialisation. Returns a note
    naming the kept head, or None."""
    state, own = read_checkpoint(path), model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and state[k].shape != own[k].shape]
    head = _head_name(model)
    if missing or unexpected or (shapes and not (head and {k.rpartition(".")[0] for k in shapes} == {head})):
        details = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in shapes]
        raise WeightsError(_mismatch_message(path, model, missing, unexpected, details))
    note = None
    if shapes:
        k = shapes[0]
        note = (f"head {head!r} kept fresh: the checkpoint's {k} is {tuple(state[k].shape)}, the model's "
                f"{tuple(own[k].shape)} (another class count)")
        state = {k: v for k, v in state.items() if k not in shapes}
        log.warning("weights %s: %s", path.name, note)
    model.load_state_dict(state, strict=not shapes)
    return note


def _head_name(model: nn.Module) -> str | None:
    """The classifier head: timm's ``get_classifier()``, else the last ``nn.Linear``."""
    if hasattr(model, "get_classifier"):
        for name, module in model.named_modules():
            if module is model.get_classifier():
                return name
    linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linear[-1] if linear else None


def replace_head(model: nn.Module, num_classes: int) -> str:
    """A fresh classifier head of ``num_classes`` outputs in place of the model's own; returns
    a note naming it."""
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(num_classes)
        return f"classifier reset to {num_classes} classes (timm reset_classifier)"
    name = _head_name(model)
    if name is None:
        raise ModelError(f"{type(model).__name__} has no nn.Linear head to replace for {num_classes} "
                         "classes: pass --num-classes equal to the pretrained class count")
    parent, _, attr = name.rpartition(".")
    old = model.get_submodule(name)
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    setattr(model.get_submodule(parent) if parent else model, attr, new)
    return f"head {name!r} replaced: {old.out_features} -> {num_classes} classes, freshly initialised"


# ---------------------------------------------------------------------------------------------
# Libraries
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def no_downloads(where: str) -> Iterator[None]:
    """Inside: torch.hub and the Hugging Face hub read their caches only; a download attempt
    raises :class:`WeightsError` naming ``where`` (never a silent download)."""
    import torch.hub as hub

    def refuse(url, dst, *args, **kwargs):
        raise WeightsError(f"{where}: not in the local cache ({dst}); fetch it once on a machine with "
                           f"internet ({url}) or pass --weights FILE")

    saved = hub.download_url_to_file
    hub.download_url_to_file = refuse
    hf = sys.modules.get("huggingface_hub.constants")
    offline = getattr(hf, "HF_HUB_OFFLINE", None)
    if hf is not None:
        hf.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.download_url_to_file = saved
        if hf is not None:
            hf.HF_HUB_OFFLINE = offline


def _torchvision(spec: str, name: str, num_classes: int, file: Path | None, tag) -> ResolvedModel:
    try:
        from torchvision import models as tv
    except ImportError as e:
        raise ModelError(f"--model {spec!r} needs torchvision ({e}): pip install torchvision") from e
    try:
        enum = tv.get_model_weights(name)
    except ValueError as e:
        raise ModelError(f"--model {spec!r}: torchvision has no model {name!r} ({e}); list them with "
                         "torchvision.models.list_models()") from e
    chosen = None
    if tag is not None and file is None:
        try:
            chosen = enum.DEFAULT if str(tag) == "DEFAULT" else enum[str(tag)]
        except KeyError as e:
            raise WeightsError(f"--weights {str(tag)!r}: {name} has the torchvision tags DEFAULT, "
                               f"{', '.join(w.name for w in enum)}") from e
    stats = (chosen or enum.DEFAULT).transforms()
    norm = Normalization(tuple(stats.mean), tuple(stats.std))
    size = int(stats.crop_size[0])
    head = None
    if chosen is not None:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / chosen.url.rsplit("/", 1)[-1]
        if not cached.is_file():
            raise WeightsError(f"torchvision weights {name} {chosen.name} are not in torch.hub's cache "
                               f"({cached}); fetch them once with internet ({chosen.url}), or pass "
                               "--weights FILE")
        with no_downloads(f"torchvision weights {name} {chosen.name}"):
            model = tv.get_model(name, weights=chosen)
        if len(chosen.meta["categories"]) != num_classes:
            head = replace_head(model, num_classes)
        weights = f"torchvision:{chosen}"
    else:
        model = tv.get_model(name, weights=None, num_classes=num_classes)
        weights = str(file) if file is not None else None
        if file is not None:
            head = load_weights(model, file)
    return ResolvedModel(model.eval(), spec, "torchvision", norm, size, weights, head)


def _timm(spec: str, name: str, num_classes: int, file: Path | None, tag) -> ResolvedModel:
    try:
        import timm
    except ImportError as e:
        raise ModelError(f"--model {spec!r} needs timm, which is not installed: pip install timm") from e
    pretrained = tag is not None and file is None
    full = name if not pretrained or str(tag) in ("pretrained", "DEFAULT") else f"{name}.{tag}"
    try:
        with no_downloads(f"timm weights {full}") if pretrained else contextlib.nullcontext():
            model = timm.create_model(full, pretrained=pretrained,
                                      **({} if pretrained else {"num_classes": num_classes}))
    except WeightsError:
        raise
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ModelError(f"--model {spec!r}: timm has no model {full!r}; list them with "
                             f"timm.list_models('*{name.split('.')[0][:8]}*')") from e
        raise WeightsError(f"timm weights {full}: {e}") from e
    except Exception as e:  # the hub's offline errors come in several types
        raise WeightsError(f"timm weights {full} are not in the local Hugging Face cache "
                           f"({type(e).__name__}); fetch them once with internet, or pass --weights FILE"
                           ) from e
    head = None
    if pretrained and model.num_classes != num_classes:
        head = replace_head(model, num_classes)
    elif file is not None:
        head = load_weights(model, file)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    norm = Normalization(tuple(cfg["mean"]), tuple(cfg["std"])) if "mean" in cfg and "std" in cfg else None
    size = int(cfg["input_size"][-1]) if "input_size" in cfg else None
    weights = f"timm:{full}" if pretrained else (str(file) if file is not None else None)
    return ResolvedModel(model.eval(), spec, "timm", norm, size, weights, head)


# ---------------------------------------------------------------------------------------------
# Files and modules
# ---------------------------------------------------------------------------------------------


def _factory(spec: str, library: str):
    where, _, attr = spec.rpartition(":")
    if library == "file":
        path = Path(where).expanduser()
        if not path.is_file():
            raise ModelError(f"--model {spec!r}: {str(path)!r} is not a file")
        unique = f"ehap_user_model_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(unique, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[unique] = module  # pickling the pruned model needs its classes importable
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[unique]
            raise ModelError(f"--model {spec!r}: running {path.name} failed: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ModelError(f"--model {spec!r}: cannot import {attr!r} from {where!r} ({e}); is the module "
                             "on PYTHONPATH? (a file: path/to/file.py:factory)") from e
    if not hasattr(module, attr):
        names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ModelError(f"--model {spec!r}: cannot import {attr!r} from {where!r}; it defines "
                         f"{', '.join(names[:8]) or 'nothing callable'}")
    return getattr(module, attr)


def _call_factory(spec: str, factory, num_classes: int) -> nn.Module:
    """``factory(num_classes=...)`` when it takes that argument, else ``factory()``."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    takes = "num_classes" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    try:
        model = factory(num_classes=num_classes) if takes else factory()
    except Exception as e:
        raise ModelError(f"--model {spec!r}: calling it failed: {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise ModelError(f"--model {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model
