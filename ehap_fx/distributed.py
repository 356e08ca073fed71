"""Scale-out with ``torch.distributed``: the process group, data-parallel training, sharding.

Launched by ``torchrun`` (see ``docs/distributed.md``); with no process group, or a group of
one, every function here is the single-process code path unchanged. The Hessian and removal
estimates split over the ranks live in ``ehap_fx.distributed_hessian``.

* :func:`data_parallel` wraps a model in ``DistributedDataParallel`` for ``finetune`` (and so
  QAT); :func:`shard_loader` gives each rank its ``1/world`` of a loader per epoch.
* :func:`broadcast_object` / :func:`check_replicas` keep the pruning plan and the pruned
  architecture identical on every rank; :func:`is_main` gates the outputs.

>>> is_distributed(), rank(), world_size(), is_main()
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
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from ehap_fx.data import CifarLoader
from ehap_fx.errors import EhapError


class DistributedError(EhapError):
    """The ranks of a process group disagree, or the group cannot be set up."""


# ---------------------------------------------------------------------------------------------
# The process group
# ---------------------------------------------------------------------------------------------


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0 (or no process group): the one process that writes outputs."""
    return rank() == 0


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
    every: list[Any] = [None] * world_size()
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
    return t.item() / world_size()


# ---------------------------------------------------------------------------------------------
# Data-parallel training
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def data_parallel(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` wrapped in ``DistributedDataParallel`` (``model`` itself without a group).

    DDP starts every rank from rank 0's weights and averages the gradients; BatchNorm (and
    QAT observer) buffers are broadcast from rank 0 at each forward. On a normal exit rank 0's
    parameters and buffers are copied to every rank, so all ranks end with the same model.
    """
    if not is_distributed():
        yield model
        return
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if dist.get_backend() == "nccl" and device.type != "cuda":
        raise DistributedError(f"NCCL trains models on GPUs but the model is on {device}: move it "
                               "to distributed.local_device(), or use backend='gloo' on the CPU")
    ids = [device.index] if device.type == "cuda" else None
    yield DistributedDataParallel(model, device_ids=ids)  # buffers: rank 0 at each forward
    broadcast_module(model)


def shard_loader(loader: Any, shuffle: bool | None = None) -> Any:
    """This rank's share of ``loader``: ``1/world`` of the samples per epoch, equal lengths.

    A :class:`~ehap_fx.data.CifarLoader` is rebuilt with its ``rank``/``world_size`` shard; a
    ``DataLoader`` over a map-style dataset gets a ``DistributedSampler``; any other iterable
    of batches is split batch-wise (rank ``r`` keeps batches ``r, r + world, ...``, the short
    ranks repeating their first batches). Without a process group ``loader`` is returned.
    """
    if not is_distributed() or loader is None:
        return loader
    r, w = rank(), world_size()
    if isinstance(loader, CifarLoader):
        return loader.sharded(r, w)
    if isinstance(loader, torch.utils.data.DataLoader) and hasattr(loader.dataset, "__getitem__"):
        return _sampled(loader, r, w, shuffle)
    return _BatchShard(loader, r, w)


def _sampled(loader, r: int, w: int, shuffle: bool | None):
    if shuffle is None:
        shuffle = isinstance(loader.sampler, RandomSampler)
    sampler = _EpochSampler(DistributedSampler(loader.dataset, w, r, shuffle=shuffle))
    return DataLoader(loader.dataset, loader.batch_size, sampler=sampler,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      pin_memory=loader.pin_memory, drop_last=loader.drop_last)


class _EpochSampler(torch.utils.data.Sampler):
    """A ``DistributedSampler`` that reshuffles at every ``iter()`` (``set_epoch`` done here)."""

    def __init__(self, inner) -> None:
        self.inner, self.epoch = inner, 0

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        self.inner.set_epoch(self.epoch)
        self.epoch += 1
        return iter(self.inner)


class _BatchShard:
    """Batches ``rank, rank + world, ...`` of an iterable; every rank yields ``ceil(n / world)``."""

    def __init__(self, batches, r: int, w: int) -> None:
        self.batches, self.r, self.w = batches, r, w

    def __len__(self) -> int:
        return -(-len(self.batches) // self.w)

    def __iter__(self):
        mine, first = 0, []
        for i, batch in enumerate(self.batches):
            if i % self.w == self.r:
                mine += 1
                if len(first) < self.w:
                    first.append(batch)
                yield batch
        for batch in first[: len(self) - mine]:
            yield batch
