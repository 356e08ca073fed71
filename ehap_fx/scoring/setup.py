"""Where every estimate starts: the working copy of the model (eval mode, BatchNorm folded,
cast to the compute dtype), its weights requiring grad, the Hessian batches on the device
(:func:`prepare` → :class:`Setup`), and the device and dtype it runs in.

>>> resolve_dtype("fp32", torch.device("cpu"))
'fp32'
"""

from __future__ import annotations

import copy
import resource
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from ehap_fx.errors import HessianError
from ehap_fx.isa import EmulatedPrecisionWarning, cpu_features, emulated_precision
from ehap_fx.scoring.fold import fold_batchnorm
from ehap_fx.scoring.options import DTYPES, HessianOptions
from ehap_fx.scoring.sampling import Batch, draw_batches


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """``"auto"``: fp16 on CUDA, bf16 on a CPU with native bf16, else fp32. An explicit half
    dtype that this CPU only emulates is kept, with an :class:`~ehap_fx.isa.EmulatedPrecisionWarning`
    naming its measured cost."""
    if dtype != "auto":
        if (message := emulated_precision(dtype, device)) is not None:
            warnings.warn(message, EmulatedPrecisionWarning, stacklevel=3)
        return dtype
    if device.type == "cuda":
        return "fp16"
    return "bf16" if device.type == "cpu" and cpu_features().bf16 else "fp32"



def prunable_modules(model: nn.Module) -> list[str]:
    """Names of every conv and linear module with a weight, in module order."""
    kinds = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    return [n for n, m in model.named_modules() if isinstance(m, kinds) and m.weight is not None]



@dataclass
class Setup:
    """The working copy of the model and what every probe needs."""

    model: nn.Module
    names: list[str]
    params: list[torch.Tensor]
    batches: list[Batch]
    loss_fn: Callable
    autocast: Callable
    dtype: torch.dtype
    device: torch.device
    fold: list[torch.Tensor | None]  # per weight: BN scale s (folded = s·original) or None



def prepare(model, data, opts: HessianOptions, names, loss_fn, device) -> Setup:
    """The eval-mode working copy (BN folded, cast), its ``names`` weights requiring grad and
    the Hessian batches on ``device``: what every estimator (here and in ``removal``) starts from."""
    dtype = DTYPES[resolve_dtype(opts.dtype, device)]
    work = copy.deepcopy(model).eval().to(device)
    scales = {}
    if opts.fold_bn:
        work, scales = fold_batchnorm(work, names)
    if opts.amp == "cast":
        work = work.to(dtype)
    fmt = torch.channels_last if opts.channels_last else torch.contiguous_format
    if opts.channels_last:
        work = work.to(memory_format=torch.channels_last)
    modules = dict(work.named_modules())
    missing = [n for n in names if n not in modules or getattr(modules[n], "weight", None) is None]
    if missing:
        raise HessianError(f"modules {missing} have no weight; pass conv/linear module names")
    for p in work.parameters():
        p.requires_grad_(False)
    params = [modules[n].weight.requires_grad_(True) for n in names]
    in_dtype = dtype if opts.amp == "cast" else torch.float32
    batches = []
    for x, y in draw_batches(data, opts.batch_size, opts.n_batches, opts.data_seed):
        x = x.to(device, in_dtype)
        if x.dim() == 4:
            x = x.contiguous(memory_format=fmt)
        batches.append((x, y.to(device)))
    if opts.amp == "autocast" and dtype != torch.float32:
        autocast = partial(torch.autocast, device_type=device.type, dtype=dtype)
    else:
        autocast = nullcontext
    fold = [scales.get(n) for n in names]
    return Setup(work, list(names), params, batches, loss_fn, autocast, dtype, device, fold)



def start_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    """The device an estimate runs on (the model's by default), its CUDA peak reset."""
    device = torch.device(device if device is not None else next(model.parameters()).device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return device



def peak_memory(device: torch.device) -> tuple[int, str]:
    """The peak memory of this process on ``device`` since ``start_device``, and its kind."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_peak_rss"
