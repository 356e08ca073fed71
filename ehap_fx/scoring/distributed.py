"""The Hessian and removal estimates split over the ranks of a ``torch.distributed`` group
(the group itself: ``ehap_fx.process_group``); without one, the single-process estimators.

:func:`estimate_hessian_distributed` returns the same combined ``HessianResult``, bit for bit,
on every rank: ``shard="probes"`` (Hutchinson, hybrid) gives each rank its own probes (seed
chunk ``round * world + rank``) on the whole Hessian batch, the rows all-gathered;
``shard="data"`` (GGN, or a batch too large for one device) each rank its shard of the
samples and the same probes, the rows summed with ``all_reduce`` weighted by each shard's
share; the MC estimator each rank its share of every batch's samples (``part=``), the labels
drawn for the whole batch. Probing runs in rounds of ``check_every`` probes (all ranks
together); ``hessian.StopRule`` judges the combined rows and rank 0's decision is broadcast.
``estimator="auto"`` is resolved on rank 0 and broadcast (a memory budget fraction is shared
by the ranks of one machine). :func:`estimate_removal_distributed` splits the removal
criterion the same way (exact: data shards; MC: sample shares), its matrices summed.

>>> _share(7, 3)
[3, 2, 2]
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ehap_fx.errors import EhapError, HessianError
from ehap_fx.process_group import (
    broadcast_object,
    get_rank,
    get_world_size,
    is_distributed,
    is_main,
    to_backend,
)
from ehap_fx.progress import bar as tqdm
from ehap_fx.scoring.hessian import (
    HessianResult,
    StopRule,
    choose_estimator,
    estimate_hessian,
    group_sensitivity,
    round_size,
)
from ehap_fx.scoring.options import SEED_STRIDE, HessianOptions
from ehap_fx.scoring.removal import RemovalResult, choose_removal, estimate_removal, removal_result
from ehap_fx.scoring.sampling import draw_batches

SHARDS = ("auto", "probes", "data")
# SEED_STRIDE (ehap_fx.scoring.hessian): probe chunk ``c`` (round * world + rank) is seeded
# ``seed + c * SEED_STRIDE``


def estimate_hessian_distributed(model: nn.Module, data, options: HessianOptions | None = None, *,
                                 shard: str = "auto", **kwargs: Any) -> HessianResult:
    """:func:`~ehap_fx.scoring.hessian.estimate_hessian` with the work split over the process group;
    ``kwargs`` are its keyword arguments (``names``, ``loss_fn``, ``device``, ``groups``), passed
    to it on every rank.

    ``shard`` is ``"probes"``, ``"data"`` or ``"auto"`` (data for GGN, probes otherwise).
    Every rank must pass the same model, data and options; all return the same result.
    Without a process group this is ``estimate_hessian`` itself.
    """
    opts = options or HessianOptions()
    if shard not in SHARDS:
        raise ValueError(f"shard={shard!r} must be one of {SHARDS}")
    names, device, groups = kwargs.get("names"), kwargs.get("device"), kwargs.get("groups")
    if not is_distributed():
        return estimate_hessian(model, data, opts, **kwargs)
    opts, choice = _agreed(opts, lambda o: choose_estimator(model, data, o, names=names, device=device))
    if shard == "auto":
        shard = "data" if opts.estimator in ("ggn", "mc") else "probes"
    if shard == "probes" and opts.estimator in ("ggn", "mc"):
        raise HessianError(f"estimator={opts.estimator!r} draws no probes: use shard='data' (or "
                           "'auto') to split its Hessian batch over the ranks")
    start = time.perf_counter()
    if opts.estimator == "mc":  # every rank: all the data, its share of the samples
        run = _runner(model, data, opts, {**kwargs, "part": (get_rank(), get_world_size())})
        if opts.mc_samples is not None:
            res = run(opts.mc_samples, opts.seed)
            rows = _weighted_sum(res.probe_traces, 1.0)
            out = _combined(res, rows, [], opts, start, ggn=None, stats=_stats(res))
        else:
            out = _probe_rounds(run, opts, shard, 1.0, groups, start)
        return dataclasses.replace(out, choice=choice)
    local, local_opts, weight = _local_data(data, opts, shard)
    run = _runner(model, local, local_opts, kwargs)
    if opts.estimator == "ggn":
        res = run(None, opts.seed)
        rows = _weighted_sum(res.probe_traces, weight)
        out = _combined(res, rows, [], opts, start, ggn=rows[0], stats=_stats(res))
    else:
        out = _probe_rounds(run, opts, shard, weight, groups, start)
    return dataclasses.replace(out, choice=choice)


def estimate_removal_distributed(model: nn.Module, data, groups: Sequence,
                                 options: HessianOptions | None = None, **kwargs: Any) -> RemovalResult:
    """:func:`~ehap_fx.scoring.removal.estimate_removal` with the work split over the process group
    (``kwargs``: its keyword arguments, e.g. ``device``): the exact pass over data shards
    (weighted as for the GGN), the MC form over sample shares; the matrices summed, so every
    rank returns the single-process result (to fp32 rounding). Without a process group this is
    ``estimate_removal`` itself."""
    opts = options or HessianOptions()
    device = kwargs.get("device")
    if not is_distributed():
        return estimate_removal(model, data, groups, opts, **kwargs)
    opts, choice = _agreed(opts, lambda o: choose_removal(model, data, groups, o, device=device))
    start = time.perf_counter()
    if opts.estimator == "mc":
        res = estimate_removal(model, data, groups, opts, **kwargs, part=(get_rank(), get_world_size()))
        weight = 1.0
    else:
        local, local_opts, weight = _local_data(data, opts, "data")
        res = estimate_removal(model, local, groups, local_opts, **kwargs)
    keys = list(res.joint)
    flat = _weighted_sum(torch.cat([res.joint[k].flatten() for k in keys]), weight)
    parts = flat.split([res.joint[k].numel() for k in keys])
    joint = {k: p.view_as(res.joint[k]) for k, p in zip(keys, parts, strict=True)}
    peak = to_backend(torch.tensor([float(res.peak_memory)], dtype=torch.float64))
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return removal_result(joint, dtype=res.dtype, seconds=time.perf_counter() - start,
                          peak_memory=int(peak.item()), peak_memory_kind=res.peak_memory_kind,
                          batch_size=opts.batch_size, n_batches=opts.n_batches,
                          method=res.method, choice=choice)


def _agreed(opts: HessianOptions, choose: Callable) -> tuple[HessianOptions, str]:
    """Rank 0's estimator choice on every rank (``"auto"`` resolved, a budget fraction shared
    by the ranks of this machine), and its reason for the report."""
    if opts.memory_budget <= 1:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", get_world_size()))
        opts = dataclasses.replace(opts, memory_budget=opts.memory_budget / max(local, 1))
    got: tuple = (None, None)
    if is_main():
        try:
            got = (choose(opts), None)
        except EhapError as e:  # every rank raises it, none waits on the broadcast
            got = (None, e)
    plan, error = broadcast_object(got)
    if error is not None:
        raise error
    reason = f"{plan.reason} (rank 0 of {get_world_size()})"
    return dataclasses.replace(opts, estimator=plan.estimator), reason


def _runner(model, local, local_opts: HessianOptions, kwargs: dict):
    """``run(probes, seed)``: this rank's ``estimate_hessian`` on its data, quietly."""

    def run(probes: int | None, seed: int) -> HessianResult:
        counts = {"mc_samples": probes} if local_opts.estimator == "mc" else {"probes": probes}
        o = dataclasses.replace(local_opts, **counts, seed=seed, progress=False)
        return estimate_hessian(model, local, o, **kwargs)

    return run


def _local_data(data, opts: HessianOptions, shard: str):
    """This rank's Hessian samples as an ``(x, y)`` pair, the options that cover them, and the
    weight of its Hessian in the batch Hessian.

    ``shard="data"``: whole batches when ``n_batches`` divides by the world size, else a slice
    of every batch (``batch_size`` split as evenly as it goes, weights ``slice / batch_size``).
    Every rank draws all the Hessian samples (on the CPU, as ``draw_batches`` does) and keeps
    its shard.
    """
    batches = draw_batches(data, opts.batch_size, opts.n_batches, opts.data_seed)  # same everywhere
    r, w = get_rank(), get_world_size()
    b, n, weight = opts.batch_size, opts.n_batches, 1.0
    if shard == "probes":
        mine = batches
    elif n % w == 0:
        mine, n, weight = batches[r::w], n // w, 1 / w
    elif b >= w:
        start, b = sum(_share(b, w)[:r]), _share(b, w)[r]
        mine, weight = [(x[start:start + b], y[start:start + b]) for x, y in batches], b / opts.batch_size
    else:
        raise HessianError(f"shard='data' needs at least one sample per rank: batch_size={b} < "
                           f"{w} ranks (n_batches={n}); raise batch_size or use shard='probes'")
    x = torch.cat([x for x, _ in mine])
    y = torch.cat([y for _, y in mine])
    return (x, y), dataclasses.replace(opts, batch_size=b, n_batches=n), weight


def _share(total: int, w: int) -> list[int]:
    """``total`` probes split over ``w`` ranks, the first ranks taking the remainder."""
    return [total // w + (r < total % w) for r in range(w)]


def _probe_rounds(run, opts: HessianOptions, shard: str, weight: float, groups, start: float
                  ) -> HessianResult:
    r, w = get_rank(), get_world_size()
    last: list[HessianResult] = []  # this round's result: the layout the scores need
    rule = StopRule(opts, lambda mean: _scores(groups, last[0], mean))
    rows: list[torch.Tensor] = []
    stats = torch.tensor([0.0, -math.inf, -math.inf], dtype=torch.float64)  # see _stats
    n = rnd = 0
    limit = opts.probes or opts.max_probes
    bar = tqdm(total=limit, desc=f"hessian {opts.estimator} x{w}",
               disable=not (opts.progress and r == 0))
    while True:
        total = round_size(opts.probes, opts, n)
        if shard == "probes":
            counts = _share(total, w)
            res = run(max(counts[r], 1), opts.seed + (rnd * w + r) * SEED_STRIDE)
            new = _gather_rows(res.probe_traces[: counts[r]], counts)
        else:
            res = run(total, opts.seed + rnd * SEED_STRIDE)
            new = _weighted_sum(res.probe_traces, weight)
        stats = _accumulate(stats, _stats(res))
        rows.append(new)
        n, rnd = n + new.shape[0], rnd + 1
        bar.update(new.shape[0])
        last[:] = [res]
        if _rank0_says(rule.done(n, rows)):  # every rank stops after the same round
            break
    bar.close()
    ggn = None
    if res.ggn is not None:
        ggn = torch.cat([res.ggn[k] for k in res.names])
        ggn = _weighted_sum(ggn[None], weight)[0] if shard == "data" else ggn
    return _combined(res, torch.cat(rows), rule.history, opts, start, ggn=ggn, stats=stats)


def _stats(res: HessianResult) -> torch.Tensor:
    """(retries, -loss scale, peak memory): summed, then maxed over rounds and ranks."""
    return torch.tensor([float(res.retries), -res.loss_scale, float(res.peak_memory)],
                        dtype=torch.float64)


def _accumulate(acc: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    out = torch.maximum(acc, new)
    out[0] = acc[0] + new[0]
    return out


def _gather_rows(mine: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Every rank's probe rows, in rank order: ``(sum(counts), channels)``."""
    width = max(counts)
    pad = torch.zeros(width, mine.shape[1])
    pad[: mine.shape[0]] = mine
    parts = [to_backend(torch.empty_like(pad)) for _ in counts]
    dist.all_gather(parts, to_backend(pad))
    return torch.cat([p[:c].cpu() for p, c in zip(parts, counts, strict=True)])


def _weighted_sum(t: torch.Tensor, weight: float) -> torch.Tensor:
    """``Σ_ranks weight · t`` (the batch Hessian from the shards'), rank 0's bits on every rank."""
    buf = to_backend(t.float() * weight)
    dist.all_reduce(buf)
    dist.broadcast(buf, src=0)
    return buf.cpu()


def _scores(groups, res: HessianResult, mean: torch.Tensor) -> torch.Tensor:
    """Channel sensitivities ``Tr/p·‖w‖²`` of the combined ``mean``, or group scores with groups."""
    tmp = dataclasses.replace(res, traces=res.split(mean))
    return torch.cat(list((group_sensitivity(groups, tmp) if groups else tmp.sensitivity()).values()))


def _rank0_says(stop: bool) -> bool:
    """Rank 0's ``stop`` on every rank."""
    flag = to_backend(torch.tensor([int(stop)]))
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def _combined(res: HessianResult, rows: torch.Tensor, history, opts: HessianOptions,
              start: float, *, ggn: torch.Tensor | None, stats: torch.Tensor) -> HessianResult:
    """This rank's last result with the combined rows, statistics and timings in place."""
    summed, maxed = to_backend(stats[:1].clone()), to_backend(stats[1:].clone())
    dist.all_reduce(summed)
    dist.all_reduce(maxed, op=dist.ReduceOp.MAX)
    retries, (neg_scale, peak) = summed.item(), maxed.cpu().tolist()
    n = rows.shape[0] if opts.estimator != "ggn" else 0
    fixed = opts.mc_samples if opts.estimator == "mc" else opts.probes  # as estimate_hessian reads it
    mean = rows.mean(0)
    se = rows.std(0) / math.sqrt(n) if n > 1 else torch.zeros_like(mean)
    return dataclasses.replace(
        res, traces=res.split(mean), stderr=res.split(se), probe_traces=rows, probes=n,
        retries=int(retries), loss_scale=-neg_scale, peak_memory=int(peak),
        converged=opts.estimator == "ggn" or fixed is not None or n < opts.max_probes,
        seconds=time.perf_counter() - start, batch_size=opts.batch_size,
        n_batches=opts.n_batches, history=tuple(history),
        ggn=res.split(ggn) if ggn is not None else None,
    )
