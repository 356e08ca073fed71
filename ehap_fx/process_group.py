"""The ``torch.distributed`` process group as ehap-fx uses it: who is running, rank 0's objects
and weights on every rank, a check that the ranks agree.

Launched by ``torchrun`` (see ``docs/distributed.md``); with no process group, or a group of
one, every function here is the single-process code path unchanged. Foundation tier: the scoring
tier splits its estimates over the ranks with these (``ehap_fx.scoring.distributed``), the
pipeline its training (``ehap_fx.distributed``).

>>> is_distributed(), get_rank(), get_world_size(), is_main()
(False, 0, 1, True)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ehap_fx.errors import DistributedError


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0 (or no process group): the one process that writes outputs."""
    return get_rank() == 0


@contextlib.contextmanager
def process_group_from_env(backend: str | None = None, timeout_s: float = 1800) -> Iterator[bool]:
    """Initialise the process group from torchrun's ``RANK``/``WORLD_SIZE``/``MASTER_*``.

    Yields whether a group of more than one rank is running; without ``WORLD_SIZE > 1`` (a
    plain ``python -m ehap_fx``) nothing is initialised. ``backend`` defaults to NCCL when
    CUDA is available (each rank on ``cuda:LOCAL_RANK``), gloo otherwise. The group is
    destroyed on exit if it was created here.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or dist.is_initialized():
        yield is_distributed()
        return
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as e:
        raise DistributedError(f"could not join the process group ({backend=}, {world=}): {e}; "
                               "launch with torchrun and check --rdzv-endpoint") from e
    try:
        yield True
    finally:
        dist.destroy_process_group()


def local_device() -> torch.device:
    """``cuda:LOCAL_RANK`` under NCCL, else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def to_backend(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the device the backend communicates from (CUDA for NCCL)."""
    return t.to(local_device())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself without a process group)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=local_device())
    return box[0]


@torch.no_grad()
def broadcast_module(model: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into ``model`` on every rank, in place."""
    if not is_distributed():
        return
    for t in (*model.parameters(), *model.buffers()):
        if t.numel() == 0:
            continue
        buf = to_backend(t.detach())
        dist.broadcast(buf, src=src)
        if buf.data_ptr() != t.data_ptr():
            t.copy_(buf)


def check_replicas(widths: dict[str, int], what: str = "pruned architecture") -> None:
    """Raise :class:`DistributedError` unless every rank holds the same ``widths``."""
    if not is_distributed():
        return
    every: list[Any] = [None] * get_world_size()
    dist.all_gather_object(every, widths)
    bad = [r for r, w in enumerate(every) if w != every[0]]
    if bad:
        diff = {k: [w.get(k) for w in every] for k in every[0] if every[bad[0]].get(k) != every[0][k]}
        raise DistributedError(f"ranks {bad} hold another {what} than rank 0 (per rank: {diff}); "
                               "give every rank the same model, data and options")


def global_mean(value: torch.Tensor) -> float:
    """The mean of a scalar tensor over the ranks, as a float (``value.item()`` alone)."""
    if not is_distributed():
        return value.item()
    t = to_backend(value.detach().float().reshape(1))
    dist.all_reduce(t)
    return t.item() / get_world_size()
