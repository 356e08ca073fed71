"""Scale-out with ``torch.distributed``: Hessian probes, fine-tuning and QAT on several processes.

Launched by ``torchrun`` (see ``docs/distributed.md``); with no process group, or a group of
one, every function here is the single-process code path unchanged.

* :func:`estimate_hessian_distributed` splits the Hessian work over the ranks and returns the
  same combined :class:`~ehap_fx.hessian.HessianResult`, bit for bit, on every rank:

  - ``shard="probes"`` (Hutchinson, hybrid): every rank draws its own probes (seed chunk
    ``round * world + rank``) on the full Hessian batch; the rows are all-gathered;
  - ``shard="data"`` (GGN, or Hutchinson/hybrid on a batch too large for one device): every
    rank takes its shard of the Hessian samples and the same probes; the rows are summed
    with ``all_reduce``, weighted by each shard's share of the batch (so the weighted sum of
    the shard Hessians is the batch Hessian).

  - the MC estimator: every rank takes its share of every batch's samples (``part=``) with
    the labels drawn for the whole batch, so the summed rows equal one process's.

  Probing runs in rounds of ``check_every`` probes (all ranks together); the stop rule of
  :class:`~ehap_fx.hessian.HessianOptions` is applied to the combined estimate and rank 0's
  decision is broadcast, so every rank stops after the same round. ``estimator="auto"`` is
  resolved on rank 0 and broadcast; the memory budget, when a fraction, is shared by the
  ranks of one machine (divided by ``LOCAL_WORLD_SIZE``).
* :func:`estimate_removal_distributed`: the removal criterion split the same way (exact:
  data shards; MC: sample shares), its matrices summed over the ranks.
* :func:`data_parallel` wraps a model in ``DistributedDataParallel`` for ``finetune`` (and so
  QAT); :func:`shard_loader` gives each rank its ``1/world`` of a loader per epoch.
* :func:`broadcast_object` / :func:`check_replicas` keep the pruning plan and the pruned
  architecture identical on every rank; :func:`is_main` gates the outputs.

>>> is_distributed(), rank(), world_size(), is_main()
(False, 0, 1, True)
>>> _share(7, 3)
[3, 2, 2]
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from ehap_fx.errors import EhapError, HessianError
from ehap_fx.hessian import (
    SEED_STRIDE,
    HessianOptions,
    HessianResult,
    choose_estimator,
    estimate_hessian,
    group_sensitivity,
    round_size,
)
from ehap_fx.removal import RemovalResult, choose_removal, estimate_removal, removal_result
from ehap_fx.sampling import draw_batches

log = logging.getLogger("ehap_fx")

SHARDS = ("auto", "probes", "data")
# SEED_STRIDE (ehap_fx.hessian): probe chunk ``c`` (round * world + rank) is seeded
# ``seed + c * SEED_STRIDE``


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


def _comm(t: torch.Tensor) -> torch.Tensor:
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
        buf = _comm(t.detach())
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
    t = _comm(value.detach().float().reshape(1))
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
    from torch.nn.parallel import DistributedDataParallel

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
    from ehap_fx.data import CifarLoader

    r, w = rank(), world_size()
    if isinstance(loader, CifarLoader):
        return loader.sharded(r, w)
    if isinstance(loader, torch.utils.data.DataLoader) and hasattr(loader.dataset, "__getitem__"):
        return _sampled(loader, r, w, shuffle)
    return _BatchShard(loader, r, w)


def _sampled(loader, r: int, w: int, shuffle: bool | None):
    from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

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


# ---------------------------------------------------------------------------------------------
# Hessian estimation
# ---------------------------------------------------------------------------------------------


def estimate_hessian_distributed(
    model: nn.Module,
    data,
    options: HessianOptions | None = None,
    *,
    names: Sequence[str] | None = None,
    loss_fn: Callable | None = None,
    device: torch.device | str | None = None,
    groups: Sequence | None = None,
    shard: str = "auto",
) -> HessianResult:
    """:func:`~ehap_fx.hessian.estimate_hessian` with the work split over the process group.

    ``shard`` is ``"probes"``, ``"data"`` or ``"auto"`` (data for GGN, probes otherwise).
    Every rank must pass the same model, data and options; all return the same result.
    Without a process group this is ``estimate_hessian`` itself.
    """
    opts = options or HessianOptions()
    if shard not in SHARDS:
        raise ValueError(f"shard={shard!r} must be one of {SHARDS}")
    kwargs = {"names": names, "loss_fn": loss_fn, "device": device, "groups": groups}
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
        run = _runner(model, data, opts, {**kwargs, "part": (rank(), world_size())})
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


def estimate_removal_distributed(
    model: nn.Module,
    data,
    groups: Sequence,
    options: HessianOptions | None = None,
    *,
    device: torch.device | str | None = None,
) -> RemovalResult:
    """:func:`~ehap_fx.removal.estimate_removal` with the work split over the process group:
    the exact pass over data shards (weighted as for the GGN), the MC form over sample shares;
    the matrices summed, so every rank returns the single-process result (to fp32 rounding).
    Without a process group this is ``estimate_removal`` itself."""
    opts = options or HessianOptions()
    if not is_distributed():
        return estimate_removal(model, data, groups, opts, device=device)
    opts, choice = _agreed(opts, lambda o: choose_removal(model, data, groups, o, device=device))
    start = time.perf_counter()
    if opts.estimator == "mc":
        res = estimate_removal(model, data, groups, opts, device=device, part=(rank(), world_size()))
        weight = 1.0
    else:
        local, local_opts, weight = _local_data(data, opts, "data")
        res = estimate_removal(model, local, groups, local_opts, device=device)
    keys = list(res.joint)
    flat = _weighted_sum(torch.cat([res.joint[k].flatten() for k in keys]), weight)
    parts = flat.split([res.joint[k].numel() for k in keys])
    joint = {k: p.view_as(res.joint[k]) for k, p in zip(keys, parts, strict=True)}
    peak = _comm(torch.tensor([float(res.peak_memory)], dtype=torch.float64))
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return removal_result(joint, dtype=res.dtype, seconds=time.perf_counter() - start,
                          peak_memory=int(peak.item()), peak_memory_kind=res.peak_memory_kind,
                          batch_size=opts.batch_size, n_batches=opts.n_batches,
                          method=res.method, choice=choice)


def _agreed(opts: HessianOptions, choose: Callable) -> tuple[HessianOptions, str]:
    """Rank 0's estimator choice on every rank (``"auto"`` resolved, a budget fraction shared
    by the ranks of this machine), and its reason for the report."""
    if opts.memory_budget <= 1:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))
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
    return dataclasses.replace(opts, estimator=plan.estimator), f"{plan.reason} (rank 0 of {world_size()})"


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
    r, w = rank(), world_size()
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
    r, w = rank(), world_size()
    agree = _Agreement(opts, groups)
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
        if agree.done(n, torch.cat(rows), res):
            break
    bar.close()
    ggn = None
    if res.ggn is not None:
        ggn = torch.cat([res.ggn[k] for k in res.names])
        ggn = _weighted_sum(ggn[None], weight)[0] if shard == "data" else ggn
    return _combined(res, torch.cat(rows), agree.history, opts, start, ggn=ggn, stats=stats)


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
    parts = [_comm(torch.empty_like(pad)) for _ in counts]
    dist.all_gather(parts, _comm(pad))
    return torch.cat([p[:c].cpu() for p, c in zip(parts, counts, strict=True)])


def _weighted_sum(t: torch.Tensor, weight: float) -> torch.Tensor:
    """``Σ_ranks weight · t`` (the batch Hessian from the shards'), rank 0's bits on every rank."""
    buf = _comm(t.float() * weight)
    dist.all_reduce(buf)
    dist.broadcast(buf, src=0)
    return buf.cpu()


class _Agreement:
    """The stop rule of ``HessianOptions`` on the combined rows; rank 0's decision is final."""

    def __init__(self, opts: HessianOptions, groups) -> None:
        self.opts, self.groups = opts, groups
        self.prev: torch.Tensor | None = None
        self.history: list[tuple[int, float, float]] = []

    def done(self, n: int, rows: torch.Tensor, res: HessianResult) -> bool:
        o = self.opts
        stop = True if o.probes is not None else self._check(n, rows, res)
        flag = _comm(torch.tensor([int(stop)]))
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    def _check(self, n: int, rows: torch.Tensor, res: HessianResult) -> bool:
        o = self.opts
        if n < o.min_probes:
            return n >= o.max_probes
        mean = rows.mean(0)
        score = self._score(mean, res)
        rel = rho = float("nan")
        ok = True
        if self.prev is not None:
            prev_mean, prev_score = self.prev
            rel = ((mean - prev_mean).abs().sum() / mean.abs().sum().clamp_min(1e-30)).item()
            rho = _spearman(score, prev_score)
        self.history.append((n, rel, rho))
        if o.tol is not None:
            ok &= rel < o.tol
        if o.rank_threshold is not None:
            ok &= rho >= o.rank_threshold
        if o.stderr_tol is not None:
            se = rows.std(0) / math.sqrt(n) if n > 1 else torch.zeros_like(mean)
            ok &= (se.sum() / mean.abs().sum().clamp_min(1e-30)).item() <= o.stderr_tol
        self.prev = (mean, score)
        return bool(ok) or n >= o.max_probes

    def _score(self, mean: torch.Tensor, res: HessianResult) -> torch.Tensor:
        """Channel sensitivities ``Tr/p·‖w‖²``, or group scores when groups were given."""
        tmp = dataclasses.replace(res, traces=_split(mean, res))
        if self.groups:
            return torch.cat(list(group_sensitivity(self.groups, None, tmp).values()))
        return torch.cat(list(tmp.sensitivity().values()))


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return ((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-30)).item()


def _split(flat: torch.Tensor, res: HessianResult) -> dict[str, torch.Tensor]:
    parts = flat.float().split([res.traces[k].shape[0] for k in res.names])
    return dict(zip(res.names, parts, strict=True))


def _combined(res: HessianResult, rows: torch.Tensor, history, opts: HessianOptions,
              start: float, *, ggn: torch.Tensor | None, stats: torch.Tensor) -> HessianResult:
    """This rank's last result with the combined rows, statistics and timings in place."""
    summed, maxed = _comm(stats[:1].clone()), _comm(stats[1:].clone())
    dist.all_reduce(summed)
    dist.all_reduce(maxed, op=dist.ReduceOp.MAX)
    retries, (neg_scale, peak) = summed.item(), maxed.cpu().tolist()
    n = rows.shape[0] if opts.estimator != "ggn" else 0
    mean = rows.mean(0)
    se = rows.std(0) / math.sqrt(n) if n > 1 else torch.zeros_like(mean)
    return dataclasses.replace(
        res, traces=_split(mean, res), stderr=_split(se, res), probe_traces=rows, probes=n,
        retries=int(retries), loss_scale=-neg_scale, peak_memory=int(peak),
        converged=opts.estimator == "ggn" or opts.probes is not None or n < opts.max_probes,
        seconds=time.perf_counter() - start, batch_size=opts.batch_size,
        n_batches=opts.n_batches, history=tuple(history),
        ggn=_split(ggn, res) if ggn is not None else None,
    )
