"""Mask pass: zero pruned channels in place instead of removing them.

``mask_channels(gm, plan)`` multiplies every channel-carrying value by a 0/1 mask. It is the
reference that ``shrink`` must match exactly (a shrunk model equals the masked original), and
a soft-pruning tool in its own right: masked models keep their shapes, so a plan can be tried,
scored and undone without rewriting weights.
"""

from __future__ import annotations

import copy
import operator

import torch
from ehap_fx.passes.group import ChannelSlots, KeptChannels, groups_of
from ehap_fx.passes.shrink import PrunePlan
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from ehap_fx import _meta


def mask_channels(gm: fx.GraphModule, plan: PrunePlan) -> PassResult:
    """Return a copy of ``gm`` whose removed channels are multiplied by zero after every node.

    Masks are registered as buffers ``_ehap_mask_<i>`` of shape ``(1, C, 1, ...)`` (``C`` at
    the value's channel dim).
    """
    groups = groups_of(gm)
    plan.validate(groups)
    out = copy.deepcopy(gm)
    keep = KeptChannels(groups, plan.masks(groups))
    count = 0
    for node in list(out.graph.nodes):
        slots = node.meta.get(_meta.CHANNELS)
        if not isinstance(slots, ChannelSlots) or node.op in ("placeholder", "output"):
            continue
        k = keep.of(slots)
        if bool(k.all()):
            continue
        ndim = len(node.meta["tensor_meta"].shape)
        name = f"_ehap_mask_{count}"
        count += 1
        shape = [1] * ndim
        shape[slots.dim] = -1  # (1, C, 1, 1), or (1, 1, 1, C) channels-last
        out.register_buffer(name, k.to(node.meta["tensor_meta"].dtype).reshape(shape))
        with out.graph.inserting_after(node):
            mask = out.graph.get_attr(name)
        with out.graph.inserting_after(mask):
            masked = out.graph.call_function(operator.mul, (node, mask))
        node.replace_all_uses_with(masked, delete_user_cb=lambda user, m=masked: user is not m)
    out.graph.lint()
    out.recompile()
    return PassResult(out, count > 0)


def random_plan(
    gm: fx.GraphModule, fraction: float = 0.5, generator: torch.Generator | None = None
) -> PrunePlan:
    """A plan that keeps a random ``fraction`` (at least one) of every prunable group's channels."""
    keep = {}
    for g in groups_of(gm).prunable:
        n = max(1, round(g.size * fraction))
        keep[g.id] = tuple(sorted(torch.randperm(g.size, generator=generator)[:n].tolist()))
    return PrunePlan(keep)
