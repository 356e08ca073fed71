"""Data-parallel training with ``torch.distributed``: DDP for ``finetune`` (and so QAT), each
rank's share of a loader.

The process group itself (ranks, broadcasts, the replica check) is ``ehap_fx.process_group``;
the Hessian and removal estimates split over the ranks are ``ehap_fx.scoring.distributed``.
With no process group, or a group of one, every function here is the single-process code path
unchanged (``docs/distributed.md``).

* :func:`data_parallel` wraps a model in ``DistributedDataParallel``;
* :func:`shard_loader` gives each rank its ``1/world`` of a loader per epoch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from ehap_fx.data import CifarLoader
from ehap_fx.errors import DistributedError
from ehap_fx.process_group import broadcast_module, get_rank, get_world_size, is_distributed


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
                               "to process_group.local_device(), or use backend='gloo' on the CPU")
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
    r, w = get_rank(), get_world_size()
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
