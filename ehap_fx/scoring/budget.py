"""Memory budgets for the Hessian passes: read what is available, predict, choose, then allocate.

An estimate killed by the OOM killer loses the user's work; a clear refusal does not. Before a
pass allocates, ``ehap_fx.scoring.hessian`` compares its predicted footprint with a budget (a fraction
of the memory available, ``HessianOptions.memory_budget``) and picks the chunk sizes, the
estimator, or a one-line ``MemoryBudgetError`` from that.

The predictions start from one measured number: the bytes autograd saves for one sample
(a one-sample forward under ``saved_tensors_hooks``), which is what the backward passes keep.

>>> fmt_bytes(3 * 2**30)
'3.00 GiB'
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn


def available_memory(device: torch.device) -> int | None:
    """Bytes free now: CUDA ``mem_get_info``; on a CPU psutil's ``available`` if installed,
    else ``MemAvailable`` of ``/proc/meminfo``; None where none of them can be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def resolve_budget(budget: float, device: torch.device) -> tuple[int, str]:
    """``budget`` in bytes (``> 1``) or as a fraction of the available memory (``<= 1``), and
    how it was obtained, for the report."""
    if budget > 1:
        return int(budget), f"memory_budget={fmt_bytes(int(budget))}"
    free = available_memory(device)
    if free is None:  # nothing readable: do not guess a limit
        return 2**62, "memory_budget unbounded (available memory unreadable)"
    return int(budget * free), f"memory_budget={budget:g} of {fmt_bytes(free)} available"


def saved_bytes_per_sample(model: nn.Module, x1: torch.Tensor, autocast: Callable | None = None,
                           during: AbstractContextManager | None = None) -> tuple[int, torch.Tensor]:
    """Bytes autograd saves in a forward of the one-sample batch ``x1`` (unique storages), and
    the output: the per-sample memory every backward pass keeps until it runs. ``during``
    (hooks that read shapes, say) is entered around the same forward."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if t.device.type != "meta":
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    leaf = x1.detach().requires_grad_(x1.is_floating_point())
    with (torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), (autocast or nullcontext)(),
          during or nullcontext()):
        out = model(leaf)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weights |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    return sum(v for k, v in seen.items() if k not in weights), out


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n / 2**10:.1f} KiB"
