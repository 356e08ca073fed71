"""Per-output-channel Hessian traces of conv/linear weights: the sensitivities EHAP ranks by.

``estimate_hessian(model, data)`` returns ``Tr(H_c)`` for every output channel ``c`` of every
prunable weight (BN and biases excluded, as in HAP), with a standard error from the per-probe
estimates. The estimators (see ``docs/hessian.md`` for the measurements behind the default):

* ``"hutchinson"``: Rademacher probes ``v``, ``Tr(H_c) ≈ mean_v Σ_{i∈c} v_i (Hv)_i`` (the paper's);
* ``"ggn"``: the exact per-channel trace of the Gauss-Newton matrix of softmax cross-entropy
  (``ehap_fx.scoring.ggn``), no sampling noise; equal to ``Tr(H_c)`` for piecewise-linear networks;
* ``"hybrid"``: ``Tr(G_c)`` exactly plus Hutchinson on ``H − G``: unbiased for any network;
* ``"mc"``: Monte-Carlo ``Tr(G_c)`` from labels drawn from the model's own softmax
  (``ehap_fx.scoring.ggn_mc``): unbiased, one backward pass per draw whatever the class count;
* ``"auto"`` (default): the exact GGN when the model has at most ``exact_max_classes``
  classes and the pass fits the memory budget, else ``"mc"`` (``result.choice`` says why).

Half precision runs the model cast to fp16/bf16; fp16 scales the loss, divides ``Hv`` back by
the scale, and redoes a probe with a halved scale when it overflows (``result.retries``).

>>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
>>> x, y = torch.randn(8, 4), torch.tensor([0, 1] * 4)
>>> opts = HessianOptions(estimator="hutchinson", dtype="fp32", batch_size=8, probes=4,
...                       progress=False)
>>> r = estimate_hessian(net, (x, y), opts)
>>> r.probes, r.traces["0"].shape, r.traces["2"].shape
(4, torch.Size([3]), torch.Size([2]))
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp

from ehap_fx.errors import HessianError
from ehap_fx.passes.group import producer_slices
from ehap_fx.progress import bar as tqdm
from ehap_fx.scoring.fold import scale_channels
from ehap_fx.scoring.ggn import ggn_channel_traces, ggn_vector_product
from ehap_fx.scoring.ggn_mc import mc_channel_traces
from ehap_fx.scoring.options import DTYPES, SEED_STRIDE, HessianOptions
from ehap_fx.scoring.plan import Plan, plan_pass
from ehap_fx.scoring.setup import Setup, peak_memory, prepare, prunable_modules, start_device


@dataclass(frozen=True)
class HessianResult:
    """Per-channel trace estimates; tensors are fp32 on the CPU, keyed by module name.

    ``probe_traces`` holds one row per probe, or per label draw for ``"mc"`` (all channels
    concatenated in ``names`` order, exact GGN part included for ``"hybrid"``), so any
    reduction of the channels has a standard error too (``group_stderr``). ``estimator`` is
    the one that ran (never ``"auto"``); ``choice`` says why, and the chunk sizes.
    ``peak_memory`` is CUDA ``max_memory_allocated``, or the process's peak RSS on a CPU
    (``peak_memory_kind`` says which).
    """

    names: tuple[str, ...]
    traces: dict[str, torch.Tensor]
    stderr: dict[str, torch.Tensor]
    channel_params: dict[str, int]
    weight_sq: dict[str, torch.Tensor]
    probe_traces: torch.Tensor
    estimator: str
    dtype: str
    probes: int
    retries: int
    loss_scale: float
    converged: bool
    seconds: float
    peak_memory: int
    peak_memory_kind: str
    batch_size: int
    n_batches: int
    ggn: dict[str, torch.Tensor] | None = None
    history: tuple[tuple[int, float, float], ...] = field(default=())
    choice: str = ""  # which estimator and chunk sizes, and why (the memory budget guard)

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """A flat per-channel vector over ``names`` as ``{module name: (channels,)}``."""
        return split_channels(flat, [self.traces[n].shape[0] for n in self.names], self.names)

    def sensitivity(self) -> dict[str, torch.Tensor]:
        """Per-channel score ``Tr(H_c) / p_c · ‖w_c‖²`` for every module."""
        return {n: self.traces[n] / self.channel_params[n] * self.weight_sq[n] for n in self.names}

    def summary(self) -> dict:
        """The figures a report needs, as plain Python values."""
        return {"estimator": self.estimator, "dtype": self.dtype, "probes": self.probes,
                "retries": self.retries, "loss_scale": self.loss_scale,
                "converged": self.converged, "seconds": round(self.seconds, 3),
                "peak_memory": self.peak_memory, "peak_memory_kind": self.peak_memory_kind,
                "batch_size": self.batch_size, "n_batches": self.n_batches,
                "choice": self.choice}


def _fp32(out):
    """The model's output in fp32 for the loss: a tensor, or every floating tensor of a tuple,
    dict or ``ModelOutput`` (a detector's, a Hugging Face model's), the structure kept."""
    if torch.is_tensor(out):
        return out.float()
    def up(t):
        return t.float() if torch.is_tensor(t) and t.is_floating_point() else t

    return torch.utils._pytree.tree_map(up, out)

class _Hvp:
    """Scaled Hessian-vector products ``s·H v`` on the fixed Hessian batches.

    With one batch and double backward, the first-order graph is built once and every probe
    costs one backward pass through it; it is rebuilt when the loss scale changes.
    """

    def __init__(self, setup: Setup, opts: HessianOptions) -> None:
        self.s, self.opts = setup, opts
        self.keep = opts.hvp == "double_backward" and len(setup.batches) == 1
        self._graph: tuple[float, list[torch.Tensor]] | None = None

    def _grads(self, x, y, scale: float) -> list[torch.Tensor]:
        with self.s.autocast():
            out = self.s.model(x)
        loss = self.s.loss_fn(_fp32(out), y)
        if not torch.isfinite(loss):
            raise HessianError(f"the loss is {loss.item()} on the Hessian batch: check the "
                               "model, the data and the loss function")
        # an overflowing scaled loss gives non-finite products: the caller retries
        return list(torch.autograd.grad(loss * scale, self.s.params, create_graph=True))

    def __call__(self, vs: list[torch.Tensor], scale: float) -> list[torch.Tensor]:
        """``vs``: one tensor per weight, shaped ``(P, *w.shape)``; returns the same shapes:
        products with the Hessian of the original weights (folded BN mapped back)."""
        products = self._products(scale_channels(vs, self.s.fold, out=False), scale)
        return scale_channels(products, self.s.fold, out=True)

    def _products(self, vs: list[torch.Tensor], scale: float) -> list[torch.Tensor]:
        if self.opts.hvp == "forward_over_reverse":
            return self._forward_over_reverse(vs, scale)
        if self.keep:
            if self._graph is None or self._graph[0] != scale:
                self._graph = (scale, self._grads(*self.s.batches[0], scale))
            return self._backward(self._graph[1], vs, retain=True)
        total = None
        for x, y in self.s.batches:
            hv = self._backward(self._grads(x, y, scale), vs, retain=False)
            total = hv if total is None else [a + b for a, b in zip(total, hv, strict=True)]
        return [t / len(self.s.batches) for t in total]

    def _backward(self, grads, vs, retain: bool) -> list[torch.Tensor]:
        batched = vs[0].shape[0] > 1
        outs = vs if batched else [v[0] for v in vs]
        hv = torch.autograd.grad(grads, self.s.params, grad_outputs=outs, retain_graph=retain,
                                 is_grads_batched=batched)
        return list(hv) if batched else [h.unsqueeze(0) for h in hv]

    def _forward_over_reverse(self, vs, scale: float) -> list[torch.Tensor]:
        names = [f"{n}.weight" if n else "weight" for n in self.s.names]
        fixed = {k: t for k, t in self.s.model.named_parameters() if k not in names}
        fixed.update(dict(self.s.model.named_buffers()))
        primal = {k: p.detach() for k, p in zip(names, self.s.params, strict=True)}
        total = [torch.zeros_like(v) for v in vs]
        for x, y in self.s.batches:
            def loss(p, x=x, y=y):
                with self.s.autocast():
                    out = functional_call(self.s.model, (p, fixed), (x,))
                return self.s.loss_fn(_fp32(out), y) * scale

            tangent = {k: v[0] for k, v in zip(names, vs, strict=True)}
            _, hv = jvp(grad(loss), (primal,), (tangent,))
            for t, k in zip(total, names, strict=True):
                t += hv[k].unsqueeze(0)
        return [t / len(self.s.batches) for t in total]


def _rademacher(params, count: int, gen: torch.Generator) -> list[torch.Tensor]:
    """``count`` probes, drawn probe after probe so the stream does not depend on batching."""
    per_probe = [[torch.randint(0, 2, p.shape, generator=gen, device=p.device, dtype=p.dtype)
                  for p in params] for _ in range(count)]
    return [torch.stack(vs) * 2 - 1 for vs in zip(*per_probe, strict=True)]


def _contrib(vs, hvs, scale: float) -> torch.Tensor:
    """Per-probe, per-channel ``Σ_{i∈c} v_i (Hv)_i / s`` in fp32: (P, total_channels)."""
    cols = [(v.float() * h.float()).flatten(2).sum(2) for v, h in zip(vs, hvs, strict=True)]
    return torch.cat(cols, dim=1) / scale


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two score vectors (ties broken by position), in float64."""
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return ((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-30)).item()


def stop_check(opts: HessianOptions, n: int, mean: torch.Tensor, se: torch.Tensor, score: torch.Tensor,
               prev: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[bool, tuple[int, float, float]]:
    """The adaptive stop rule of ``opts`` at one check point, pure (both drivers apply it through
    :class:`StopRule`): ``mean``/``se`` the per-channel estimate and its standard error after ``n``
    probes, ``score`` its ranking scores, ``prev`` the previous check's ``(mean, score)`` (None at
    first). Returns whether to stop and the row ``(n, relative change of the mean, Spearman ρ)``."""
    rel = rho = float("nan")
    ok = True
    if prev is not None:
        rel = ((mean - prev[0]).abs().sum() / mean.abs().sum().clamp_min(1e-30)).item()
        rho = spearman(score, prev[1])
    if opts.tol is not None:
        ok &= rel < opts.tol
    if opts.rank_threshold is not None:
        ok &= rho >= opts.rank_threshold
    if opts.stderr_tol is not None:
        ok &= (se.sum() / mean.abs().sum().clamp_min(1e-30)).item() <= opts.stderr_tol
    return bool(ok) or n >= opts.max_probes, (n, rel, rho)


class StopRule:
    """:func:`stop_check` on the probe rows every ``check_every`` probes from ``min_probes`` on,
    with its ``history``: what both drivers (here, and ``distributed_hessian`` on all ranks' rows) ask."""

    def __init__(self, opts: HessianOptions, score: Callable[[torch.Tensor], torch.Tensor]):
        self.opts, self.score = opts, score
        self.prev: tuple[torch.Tensor, torch.Tensor] | None = None
        self.last = 0
        self.history: list[tuple[int, float, float]] = []

    def done(self, n: int, rows: list[torch.Tensor]) -> bool:
        """After ``n`` probes whose per-channel rows are ``rows`` (``(P_i, channels)`` each)."""
        o = self.opts
        if o.probes is not None:
            return n >= o.probes
        if n < o.min_probes or (n - self.last < o.check_every and n < o.max_probes):
            return n >= o.max_probes
        self.last = n
        every = torch.cat(rows)
        mean = every.mean(0)
        se = every.std(0) / math.sqrt(n) if n > 1 else torch.zeros_like(mean)
        score = self.score(mean)
        stop, row = stop_check(o, n, mean, se, score, self.prev)
        self.history.append(row)
        self.prev = (mean, score)
        return stop


def estimate_hessian(
    model: nn.Module,
    data,
    options: HessianOptions | None = None,
    *,
    names: Sequence[str] | None = None,
    loss_fn: Callable | None = None,
    device: torch.device | str | None = None,
    groups: Sequence | None = None,
    part: tuple[int, int] | None = None,
) -> HessianResult:
    """Per-output-channel Hessian traces of the ``names`` weights (default: all conv/linear).

    ``data``: see :func:`draw_batches`. ``loss_fn(logits_fp32, y)`` defaults to mean
    cross-entropy (required by every estimator but ``"hutchinson"``). ``groups``
    (channel groups) makes the rank-stability rule compare group scores instead of channel
    scores. ``part=(rank, world)`` (``"mc"`` only): that share of every batch's samples, its
    rows still divided by the whole batch, so the parts' rows sum to the whole estimate
    (``ehap_fx.scoring.distributed``). The model itself is not modified: the estimate runs on an
    eval-mode copy.
    """
    opts = options or HessianOptions()
    names = list(names) if names is not None else prunable_modules(model)
    if not names:
        raise HessianError("the model has no conv/linear weights to estimate")
    if loss_fn is not None and opts.estimator != "hutchinson":
        raise HessianError(f"estimator={opts.estimator!r} needs the default cross-entropy loss;"
                           " use estimator='hutchinson' with a custom loss_fn")
    device = start_device(model, device)
    start = time.perf_counter()
    s = prepare(model, data, opts, names, loss_fn or F.cross_entropy, device)
    plan = plan_pass(s, opts, weights=sum(p.numel() for p in s.params), part=part)
    if part is not None and plan.estimator != "mc":
        raise HessianError(f"part= splits the MC estimator's samples; {plan.estimator!r} is "
                           "split by ehap_fx.scoring.distributed's shards")
    p_c = [p[0].numel() for p in s.params]
    w_sq = torch.cat([p.detach().float().pow(2).flatten(1).sum(1) / (1 if k is None else k.pow(2))
                      for p, k in zip(s.params, s.fold, strict=True)])
    pc_flat = torch.cat([torch.full((p.shape[0],), float(n), device=device)
                         for p, n in zip(s.params, p_c, strict=True)])
    rows_cols = _group_index(groups, names, s.params, device) if groups else None

    def score(mean):
        per_channel = mean / pc_flat * w_sq
        if rows_cols is None:
            return per_channel
        rows, cols, size = rows_cols
        return torch.zeros(size, device=device).index_add_(0, rows, per_channel[cols])

    ggn = _ggn_part(s, plan.ggn_chunk) if plan.estimator in ("ggn", "hybrid") else None
    if plan.estimator == "ggn":
        samples, retries, scale, history = ggn[None], 0, 1.0, ()
    elif plan.estimator == "mc":
        samples, retries, scale, history = _mc_loop(s, opts, plan, StopRule(opts, score), part)
    else:
        samples, retries, scale, history = _probe_loop(s, opts, ggn, StopRule(opts, score))
    n = samples.shape[0] if plan.estimator != "ggn" else 0
    fixed = opts.mc_samples if plan.estimator == "mc" else opts.probes
    converged = plan.estimator == "ggn" or fixed is not None or n < opts.max_probes
    mean = samples.mean(0)
    se = samples.std(0) / n**0.5 if n > 1 else torch.zeros_like(mean)
    peak, kind = peak_memory(device)
    sizes = [p.shape[0] for p in s.params]
    return HessianResult(
        names=tuple(names),
        traces=split_channels(mean, sizes, names),
        stderr=split_channels(se, sizes, names),
        channel_params=dict(zip(names, p_c, strict=True)),
        weight_sq=split_channels(w_sq, sizes, names),
        probe_traces=samples.cpu(),
        estimator=plan.estimator,
        dtype={v: k for k, v in DTYPES.items()}[s.dtype],
        probes=n, retries=retries, loss_scale=scale, converged=converged,
        seconds=time.perf_counter() - start, peak_memory=peak, peak_memory_kind=kind,
        batch_size=opts.batch_size, n_batches=opts.n_batches,
        ggn=split_channels(ggn, sizes, names) if ggn is not None else None,
        history=tuple(history), choice=plan.reason,
    )


def choose_estimator(model: nn.Module, data, options: HessianOptions | None = None, *,
                     names: Sequence[str] | None = None, device: torch.device | str | None = None,
                     extra: int = 0) -> Plan:
    """The :class:`Plan` ``estimate_hessian`` would follow on these arguments, without running
    the pass (one one-sample forward): what ``ehap_fx.scoring.distributed`` agrees on across ranks."""
    opts = options or HessianOptions()
    names = list(names) if names is not None else prunable_modules(model)
    s = prepare(model, data, opts, names, F.cross_entropy, start_device(model, device))
    return plan_pass(s, opts, weights=sum(p.numel() for p in s.params), extra=extra)


def round_size(fixed: int | None, opts: HessianOptions, n: int) -> int:
    """Probes or draws (all ranks together) in the next round of an adaptive estimate."""
    if fixed is not None:
        return fixed
    size = max(opts.min_probes, opts.check_every) if n == 0 else opts.check_every
    return min(size, opts.max_probes - n)


def _mc_loop(s: Setup, opts: HessianOptions, plan: Plan, rule: StopRule, part):
    """Label draws in rounds (seeded ``seed + round · SEED_STRIDE``) until the stop rule holds
    (one round of ``mc_samples`` when fixed); returns (rows, retries, scale, history)."""
    if s.batches[0][0].is_floating_point():
        for p in s.params:  # gradients flow to the input: no weight gradient is computed
            p.requires_grad_(False)
    scaling = s.dtype == torch.float16 or opts.loss_scale is not None
    # the same gradient magnitudes as the mean-loss rules: per-sample cotangents are N× larger
    base = float(opts.loss_scale or (2.0**16 if s.dtype == torch.float16 else 1.0))
    scale = 2.0 ** math.floor(math.log2(max(base / opts.batch_size, 1.0))) if scaling else 1.0
    rows, retries, n, rnd = [], 0, 0, 0
    fold = _fold_sq(s)
    while True:
        draws = round_size(opts.mc_samples, opts, n)
        for tries in range(opts.max_retries + 1):  # noqa: B007  (read after the loop: retries += tries)
            got = mc_channel_traces(s.model, s.names, [x for x, _ in s.batches], draws,
                                    opts.seed + rnd * SEED_STRIDE, chunk=plan.mc_chunk,
                                    autocast=s.autocast, scale=scale, part=part)
            if bool(torch.isfinite(got).all()):
                break
            if not scaling:
                raise HessianError(f"non-finite per-sample gradients in {s.dtype}: use dtype='fp32'")
            scale /= 2
        else:
            raise HessianError(f"per-sample gradients still overflow after {opts.max_retries} "
                               f"retries (loss scale {scale}): use dtype='bf16' or 'fp32'")
        retries += tries
        rows.append(got * fold)
        n, rnd = n + draws, rnd + 1
        if opts.mc_samples is not None or rule.done(n, rows):
            break
    return torch.cat(rows), retries, scale, rule.history


def _group_index(groups, names, params, device):
    """Scatter indices so that group scores = index_add(channel scores): (rows, cols, size)."""
    offsets = dict(zip(names, torch.tensor([0] + [p.shape[0] for p in params]).cumsum(0).tolist(),
                       strict=False))
    rows, cols, start = [], [], 0
    for g in groups:
        for module, index in producer_slices(g):
            if module in offsets:
                rows.append((torch.arange(g.size)[:, None] + start).expand_as(index).flatten())
                cols.append((index + offsets[module]).flatten())
        start += g.size
    if not rows:
        raise HessianError("none of the groups has a producer among the estimated modules")
    return torch.cat(rows).to(device), torch.cat(cols).to(device), start


def split_channels(flat: torch.Tensor, sizes: Sequence[int], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """A flat per-channel vector as ``{module name: (channels,)}`` (fp32, on the CPU)."""
    return dict(zip(names, flat.detach().float().cpu().split(list(sizes)), strict=True))


def _ggn_part(s: Setup, chunk: int) -> torch.Tensor:
    pnames = [f"{n}.weight" if n else "weight" for n in s.names]
    total = None
    for x, _ in s.batches:
        parts = ggn_channel_traces(s.model, pnames, x, chunk=chunk, autocast=s.autocast)
        flat = torch.cat(parts)
        total = flat if total is None else total + flat
    return total / len(s.batches) * _fold_sq(s)


def _fold_sq(s: Setup) -> torch.Tensor:
    """Per channel, the square of its BN scale (traces of folded weights -> original ones)."""
    return torch.cat([torch.ones(p.shape[0], device=s.device) if k is None else k.pow(2)
                      for p, k in zip(s.params, s.fold, strict=True)])


def _probe_loop(s: Setup, opts: HessianOptions, ggn, rule: StopRule):
    """Draw probes until the stop rule holds; returns (per-probe rows, retries, scale, history)."""
    scaling = s.dtype == torch.float16 or opts.loss_scale is not None
    scale = float(opts.loss_scale or (2.0**16 if s.dtype == torch.float16 else 1.0))
    gen = torch.Generator(device=s.device).manual_seed(opts.seed)
    hvp = _Hvp(s, opts)
    pnames = [f"{n}.weight" if n else "weight" for n in s.names]
    rows: list[torch.Tensor] = []
    retries = 0
    limit = opts.probes or opts.max_probes
    bar = tqdm(total=limit, desc=f"hessian {opts.estimator}", disable=not opts.progress)
    n = 0
    while True:
        vs = _rademacher(s.params, min(opts.probe_batch, limit - n), gen)
        row, scale, tries = _one_step(s, hvp, vs, scale, scaling, opts, ggn, pnames)
        retries += tries
        rows.append(row)
        n += row.shape[0]
        bar.update(row.shape[0])
        if rule.done(n, rows):
            break
    bar.close()
    samples = torch.cat(rows)
    if not scaling and not torch.isfinite(samples).all():
        raise HessianError(f"non-finite Hessian-vector products in {s.dtype}: use dtype='fp32'")
    return samples, retries, scale, rule.history


def _one_step(s, hvp, vs, scale, scaling, opts, ggn, pnames):
    """One batch of probes, redone with a halved loss scale while it overflows."""
    for tries in range(opts.max_retries + 1):
        row = _contrib(vs, hvp(vs, scale), scale)
        if ggn is not None:
            row = row - _gv_contrib(s, vs, pnames) + ggn
        if not scaling or bool(torch.isfinite(row).all()):
            return row, scale, tries
        scale /= 2
    raise HessianError(f"Hessian-vector products still overflow after {opts.max_retries} "
                       f"retries (loss scale {scale}): use dtype='bf16' or 'fp32'")


def _gv_contrib(s: Setup, vs, pnames) -> torch.Tensor:
    """Per-probe ``Σ_{i∈c} v_i (G v)_i`` in fp32, averaged over the Hessian batches."""
    rows = []
    for p in range(vs[0].shape[0]):
        v = [t[p] for t in vs]
        folded = [t[0] for t in scale_channels([t[p : p + 1] for t in vs], s.fold, out=False)]
        gv = None
        for x, _ in s.batches:
            part = ggn_vector_product(s.model, pnames, x, folded, autocast=s.autocast)
            gv = part if gv is None else [a + b for a, b in zip(gv, part, strict=True)]
        gv = [g[0] for g in scale_channels([g.unsqueeze(0) for g in gv], s.fold, out=True)]
        rows.append(_contrib([t.unsqueeze(0) for t in v],
                             [g.unsqueeze(0) for g in gv], float(len(s.batches))))
    return torch.cat(rows)


def _group_rows(groups, result: HessianResult, rows: torch.Tensor) -> dict[int, torch.Tensor]:
    """Σ over producer members of per-channel ``rows`` (R, total) -> {group id: (R, size)}."""
    offsets, start = {}, 0
    for n in result.names:
        offsets[n] = start
        start += result.traces[n].shape[0]
    scale = torch.cat([result.weight_sq[n] / result.channel_params[n] for n in result.names])
    scored = rows * scale  # (R, total)
    out = {}
    for g in groups:
        acc = torch.zeros(rows.shape[0], g.size)
        for module, index in producer_slices(g):
            if module not in offsets:
                raise HessianError(f"group {g.id}: module {module!r} has no Hessian trace; "
                                   f"estimate it with names including {module!r}")
            acc += scored[:, offsets[module] + index].sum(-1)  # (R, size, k) -> (R, size)
        out[g.id] = acc
    return out


def group_sensitivity(groups, result: HessianResult) -> dict[int, torch.Tensor]:
    """Per group, a ``(size,)`` score per channel: Σ over producers of ``Tr(H_c)/p_c·‖w_c‖²``
    (``‖w_c‖²`` from ``result``: the weights the traces were estimated at)."""
    mean = torch.cat([result.traces[n] for n in result.names])[None]
    return {k: v[0] for k, v in _group_rows(groups, result, mean).items()}


def group_stderr(groups, result: HessianResult) -> dict[int, torch.Tensor]:
    """Standard error of :func:`group_sensitivity` from the per-probe estimates (0 for GGN)."""
    rows = _group_rows(groups, result, result.probe_traces)
    n = result.probe_traces.shape[0]
    if n < 2:
        return {k: torch.zeros(v.shape[1]) for k, v in rows.items()}
    return {k: v.std(0) / n**0.5 for k, v in rows.items()}
