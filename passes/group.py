"""Channel-group analysis: which channels of a traced CNN must be pruned together.

(Work in progress: the data model below is the contract other passes build on.)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Member:
    """One place where a group's channels live.

    ``index`` has shape ``(group.size, k)``: channel ``i`` of the group is the ``k`` indices
    ``index[i]`` along ``dim`` of the member's tensor (``k > 1`` after a flatten, where one
    channel feeds ``H*W`` features of a linear layer).

    ``role`` says what the member is: ``"out"`` output channels of a conv/linear weight
    (``dim=0``), ``"in"`` its input channels (``dim=1``), ``"norm"`` a per-channel parameter
    or buffer of a norm layer, ``"pad"`` zero channels made by ``F.pad``, ``"value"`` a
    graph value that carries the channels (activations, adds, cats...).
    """

    node: str
    module: str | None
    role: str
    dim: int
    index: torch.Tensor


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that can only be removed together; ``pinned`` says why it never is."""

    id: int
    size: int
    members: tuple[Member, ...]
    pinned: str | None = None

    @property
    def prunable(self) -> bool:
        return self.pinned is None


def producer_slices(group: ChannelGroup) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(module_name, index)`` for every conv/linear whose output channels the group owns.

    ``index`` is a ``(group.size, k)`` LongTensor of output-channel indices (dim 0 of
    ``module.weight``); this is what Hessian and magnitude scores reduce over.
    """
    for m in group.members:
        if m.role == "out" and m.module is not None:
            yield m.module, m.index
