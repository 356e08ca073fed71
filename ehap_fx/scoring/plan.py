"""What a pass will run, decided before it allocates: the estimator (``"auto"`` resolved), the
chunk sizes, and the predicted footprint against the memory budget (:func:`plan_pass` →
:class:`Plan`; the reason is reported as ``result.choice``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ehap_fx.errors import HessianError, MemoryBudgetError
from ehap_fx.scoring.budget import fmt_bytes, resolve_budget, saved_bytes_per_sample
from ehap_fx.scoring.ggn_mc import ReduceSize, share
from ehap_fx.scoring.options import HessianOptions
from ehap_fx.scoring.setup import Setup


@dataclass(frozen=True)
class Plan:
    """What a pass runs, sized to the memory budget before it allocates (``plan_pass``)."""

    estimator: str  # resolved: never "auto"
    ggn_chunk: int
    mc_chunk: int
    footprint: int  # predicted peak bytes of the pass, beyond what is allocated already
    budget: int
    reason: str



def plan_pass(s: Setup, opts: HessianOptions, *, weights: int, extra: int = 0,
              part: tuple[int, int] | None = None) -> Plan:
    """Resolve ``"auto"`` and size the chunks from the predicted footprints (bytes):

    * exact GGN, ``c`` samples per chunk: ``2c·(A + K·(W + A))`` (``K`` classes, ``W`` the
      estimated weights, ``A`` what autograd saves per sample; every class carries a
      per-sample gradient and a backward pass, the 2 covers transients);
    * MC, ``m`` samples per pass: ``m·(3A + R·(e + 4))`` (the graph kept over the draws and
      one backward's transients, ``R`` the largest per-layer reduction buffer in the compute
      dtype of size ``e`` and in fp32);
    * Hutchinson: ``3A`` per sample of the whole batch (the double-backward graph).

    ``extra`` bytes are reserved for the caller (the removal matrices). A pass that does not
    fit even at one sample raises :class:`MemoryBudgetError` naming what to change.
    """
    x1 = s.batches[0][0][:1].clone()  # its own storage: a view of the batch counts all of it as saved
    sizes = ReduceSize(s.model, s.names)
    saved, out = saved_bytes_per_sample(s.model, x1, s.autocast, during=sizes)
    e = s.dtype.itemsize
    budget, how = resolve_budget(opts.memory_budget, s.device)
    room = _Room(budget, budget - extra, how)
    est = opts.estimator
    if est in ("hutchinson", "hybrid"):
        probes = _probe_plan(opts, 3 * saved * opts.batch_size, room)
        if est == "hutchinson":  # any loss, any output
            return probes
    if not torch.is_tensor(out) or out.dim() != 2:
        raise HessianError(f"estimator={est!r} needs (N, classes) logits; the model returns "
                           f"{getattr(out, 'shape', type(out).__name__)} for one sample: use "
                           "estimator='hutchinson' with a loss_fn")
    classes, why = out.shape[-1], ""
    if est != "mc":
        exact, why = _exact_plan(opts, classes, 2 * (saved + classes * (weights * e + saved)), room)
        if exact is not None:
            return exact
    lo, hi = share(opts.batch_size, part)
    return _mc_plan(opts, 3 * saved + sizes.worst * (e + 4), hi - lo, room, why)



@dataclass(frozen=True)
class _Room:
    budget: int  # bytes
    room: int  # the budget less what the caller reserved
    how: str  # how the budget was obtained, for the reason

    def __str__(self) -> str:
        return f"{fmt_bytes(self.room)} ({self.how})"



def _probe_plan(opts: HessianOptions, need: int, room: _Room) -> Plan:
    if need > room.room:
        raise MemoryBudgetError(
            f"estimator={opts.estimator!r}: a Hessian batch of {opts.batch_size} needs "
            f"~{fmt_bytes(need)} > {room}: lower batch_size (n_batches keeps the samples) or "
            "raise memory_budget")
    return Plan(opts.estimator, opts.ggn_chunk, 0, need, room.budget,
                f"hutchinson: ~{fmt_bytes(need)} <= {room}")



def _exact_plan(opts: HessianOptions, classes: int, per_sample: int, room: _Room
                ) -> tuple[Plan | None, str]:
    """The exact GGN's plan, or None and why not (``"auto"`` only; else an error)."""
    est = opts.estimator
    chunk = min(opts.ggn_chunk, room.room // per_sample)
    if est == "auto" and classes > opts.exact_max_classes:
        return None, (f"{classes} classes > exact_max_classes={opts.exact_max_classes} (the "
                      "exact GGN's time grows with the classes)")
    if chunk < 1 and est == "auto":
        return None, f"the exact GGN needs ~{fmt_bytes(per_sample)} per sample > {fmt_bytes(room.room)}"
    if chunk < 1:
        raise MemoryBudgetError(
            f"estimator={est!r} with {classes} classes needs ~{fmt_bytes(per_sample)} for one "
            f"sample > {room}: use estimator='auto' or 'mc', or raise memory_budget")
    lowered = f", ggn_chunk lowered from {opts.ggn_chunk}" if chunk < opts.ggn_chunk else ""
    name = "exact GGN" if est != "hybrid" else "hybrid (exact GGN part)"
    return Plan("ggn" if est == "auto" else est, chunk, 0, chunk * per_sample, room.budget,
                f"{name}: {classes} classes, ~{fmt_bytes(chunk * per_sample)} with ggn_chunk="
                f"{chunk}{lowered} <= {room}"), ""



def _mc_plan(opts: HessianOptions, per_sample: int, samples: int, room: _Room, why: str) -> Plan:
    chunk = min(opts.mc_chunk or samples, samples, room.room // per_sample)
    if chunk < 1:
        raise MemoryBudgetError(
            f"the MC estimator needs ~{fmt_bytes(per_sample)} for one sample > {room}: raise "
            "memory_budget, or use smaller inputs")
    draws = f"mc_samples={opts.mc_samples}" if opts.mc_samples else "draws until the stop rule"
    return Plan("mc", opts.ggn_chunk, chunk, chunk * per_sample, room.budget,
                f"MC GGN ({draws}){': ' + why if why else ''}; {chunk} samples per pass, "
                f"~{fmt_bytes(chunk * per_sample)} <= {room}")
