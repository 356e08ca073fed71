"""Monte-Carlo Gauss-Newton: ``Tr(G_c)`` and the removal matrices at a cost free of the class count.

The exact pass (``ehap_fx.scoring.ggn``) backpropagates one cotangent per class and sample: its time
and memory grow with the number of classes (1,000 for ImageNet). For a label ``ŷ`` drawn
from the model's own softmax ``p_n``::

    E_ŷ[(p_n − e_ŷ)(p_n − e_ŷ)ᵀ] = diag p_n − p_n p_nᵀ

so ``g_n = J_nᵀ(p_n − e_ŷ)``, the gradient of ``CE(f(x_n), ŷ)``, gives an unbiased estimate
``Tr(G_c) = 1/N Σ_n E_ŷ ‖(g_n)_c‖²`` from one backward pass per draw, whatever the classes.

Per-sample gradients are never summed over the batch nor kept for all layers at once: a
forward hook keeps each conv/linear's input ``a``, a tensor hook on its output receives
``b = ∂ℓ/∂out`` during the backward pass, and the layer's reduction runs right there:

* traces: ``‖(b ⋆ a)_c‖²`` per sample and output channel, either from the per-sample weight
  gradient ``B Uᵀ`` (``U``: the unfolded input, ``(C_in·k², T)``) or, when the spatial size
  ``T`` is small, from the ``T × T`` Gram matrix ``Uᵀ U`` (whichever costs fewer multiplies);
* removal: ``⟨W[:, i], (b ⋆ a)[:, i]⟩ = Σ_t a_i · (Wᵀ ⋆ b)_i`` per sample and input channel,
  the input gradient of that layer alone times its input: no per-sample weight gradient.

Nothing requires a weight gradient (the input does), so each draw costs one backward pass of
activation gradients plus these reductions, about one ordinary training step.

>>> net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4))
>>> x = torch.randn(5, 2, 4, 4)
>>> rows = mc_channel_traces(net, ["0", "3"], [x], draws=3, seed=0)
>>> rows.shape  # one row per draw: 3 + 4 channels
torch.Size([3, 7])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from ehap_fx.errors import HessianError

KINDS = (nn.Conv1d, nn.Conv2d, nn.Linear)


def label_noise(seed: int, draws: int, batch_sizes: Sequence[int]) -> list[torch.Tensor]:
    """Uniforms ``(draws, N_b)`` per Hessian batch, on the CPU: ``ŷ`` is their inverse CDF
    under ``p``. Drawn for whole batches, so any split of the samples sees the same labels."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(draws, n, generator=gen) for n in batch_sizes]


def share(total: int, part: tuple[int, int] | None) -> tuple[int, int]:
    """Samples ``[lo, hi)`` of a batch of ``total`` that part ``(r, w)`` processes (all if None)."""
    if part is None:
        return 0, total
    r, w = part
    sizes = [total // w + (i < total % w) for i in range(w)]
    return sum(sizes[:r]), sum(sizes[: r + 1])


class _Hooks:
    """Forward hooks on the selected modules; ``reduce(module, a, b)`` runs as each output's
    gradient arrives, its result kept in ``out[name]`` (summed over repeated calls when
    ``linear``, refused otherwise: a squared norm of a sum is not a sum of squared norms)."""

    def __init__(self, modules: dict[str, nn.Module], reduce: Callable, linear: bool) -> None:
        self.modules, self.reduce, self.linear = modules, reduce, linear
        self.out: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = {}
        self.handles = []

    def __enter__(self) -> _Hooks:
        for name, m in self.modules.items():
            self.handles.append(m.register_forward_hook(self._forward(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()

    def _forward(self, name: str):
        def hook(module, args, output):
            self.calls[name] = self.calls.get(name, 0) + 1
            if self.calls[name] > 1 and not self.linear:
                raise HessianError(f"module {name!r} runs {self.calls[name]} times per forward: "
                                   "its per-sample gradient is a sum; use estimator='ggn'")
            a, version = args[0], args[0]._version
            if output.requires_grad:
                output.register_hook(lambda b: self._backward(name, module, a, version, b))
        return hook

    def _backward(self, name, module, a, version, b) -> None:
        if a._version != version:
            raise HessianError(f"the input of module {name!r} was modified in place after it was "
                               "read: make the op before it out-of-place (inplace=False)")
        got = self.reduce(module, a, b)
        self.out[name] = got if name not in self.out else self.out[name] + got


def _padded(conv: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """``a`` padded as the conv pads it (any ``padding_mode``, ``"same"`` included), as 2-D."""
    if isinstance(conv, nn.Conv1d):
        a = a.unsqueeze(2)
    pad = conv._reversed_padding_repeated_twice
    if isinstance(conv, nn.Conv1d):
        pad = [*pad, 0, 0]
    if any(pad):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        a = F.pad(a, pad, mode=mode)
    return a


def _conv2d_args(conv: nn.Module) -> tuple[tuple, tuple, tuple]:
    """(kernel, stride, dilation) as 2-D pairs (a Conv1d runs as a 1×k Conv2d)."""
    if isinstance(conv, nn.Conv1d):
        return (1, *conv.kernel_size), (1, *conv.stride), (1, *conv.dilation)
    return conv.kernel_size, conv.stride, conv.dilation


def _as_matrices(module: nn.Module, a: torch.Tensor, b: torch.Tensor):
    """``U (m, G, K, T)`` and ``B (m, G, C_out/G, T)``: the per-sample weight gradient of group
    ``g`` is ``B[:, g] @ U[:, g]ᵀ`` (``K = C_in/G · k``)."""
    m = a.shape[0]
    if isinstance(module, nn.Linear):
        u = a.reshape(m, -1, a.shape[-1]).transpose(1, 2)  # (m, in, T)
        return u.unsqueeze(1), b.reshape(m, -1, b.shape[-1]).transpose(1, 2).unsqueeze(1)
    kernel, stride, dilation = _conv2d_args(module)
    a = _padded(module, a)
    u = _im2col(a, kernel, dilation, stride)  # (m, C_in·k, T)
    g = module.groups
    t = u.shape[-1]
    return u.reshape(m, g, -1, t), b.reshape(m, g, -1, t)


def _im2col(a: torch.Tensor, kernel, dilation, stride) -> torch.Tensor:
    """``F.unfold`` of the padded ``a`` (same layout), from a strided view: one copy, about
    twice as fast as ``im2col`` on a CPU. (m, C, H, W) -> (m, C·kh·kw, T)."""
    (kh, kw), (dh, dw), (sh, sw) = kernel, dilation, stride
    if (kh, kw) == (1, 1):
        return a[:, :, ::sh, ::sw].flatten(2)
    v = a.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)[..., ::dh, ::dw]
    m, c, ho, wo = v.shape[:4]
    return v.permute(0, 1, 4, 5, 2, 3).reshape(m, c * kh * kw, ho * wo)


def channel_sq_norms(module: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``‖(per-sample weight gradient)_c‖²`` for every sample and output channel: (m, C_out), fp32."""
    if not isinstance(module, nn.Linear) and module.in_channels == module.groups > 1:
        return _depthwise_sq_norms(module, a, b.to(a.dtype))
    return im2col_sq_norms(module, a, b)


def _gram_is_cheaper(g: int, c: int, k: int, t: int) -> bool:
    """Whether the squared norms go through the T×T Gram of the unfolded input, strictly fewer
    multiplies: ``T² (K + C)`` against ``C·T·K`` per group (``ReduceSize`` sizes the same choice)."""
    return g * t * t * k + g * c * t * t < g * c * t * k


def im2col_sq_norms(module: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """:func:`channel_sq_norms` through the unfolded input, for any conv (depthwise too: the
    path ``tools/bench_hessian.py`` measures the depthwise one against) and linear layer."""
    u, bb = _as_matrices(module, a, b.to(a.dtype))
    m, g, k, t = u.shape
    if _gram_is_cheaper(g, bb.shape[2], k, t):
        gram = u.float().transpose(2, 3) @ u.float()  # (m, G, T, T)
        bf = bb.float()
        return ((bf @ gram) * bf).sum(-1).reshape(m, -1)
    return (bb @ u.transpose(2, 3)).float().pow(2).sum(-1).reshape(m, -1)  # (m, G, C/G, K) -> (m, C)


def _depthwise_sq_norms(conv: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Depthwise (one input channel per group): the per-sample weight gradient is itself a
    depthwise convolution, of the padded input by the output gradient with the roles of
    stride and dilation swapped, over ``m·C`` groups at once. Through ``im2col`` it was
    ``m·C`` tiny ``(1×T)·(T×k²)`` products, a third of efficientnet_b0's MC time
    (docs/hessian.md)."""
    ap = _padded(conv, a)
    b2 = b.unsqueeze(2) if isinstance(conv, nn.Conv1d) else b
    kernel, stride, dilation = _conv2d_args(conv)
    m, c = ap.shape[:2]
    g = F.conv2d(ap.reshape(1, m * c, *ap.shape[2:]), b2.reshape(m * b2.shape[1], 1, *b2.shape[2:]),
                 stride=dilation, dilation=stride, groups=m * c)  # (1, m·C_out, ≥ kh, ≥ kw)
    g = g[0, :, : kernel[0], : kernel[1]].float()
    return g.reshape(m, b2.shape[1], -1).pow(2).sum(-1)


def input_directional(module: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``⟨W[:, i], (per-sample weight gradient)[:, i]⟩`` per sample and index ``i`` of the
    weight's dim 1: (m, W.shape[1]) fp32 (for a grouped conv, summed over its groups)."""
    w = module.weight
    b = b.to(w.dtype)
    if isinstance(module, nn.Linear):
        gi = b @ w  # (m, ..., in)
        return (a.float() * gi.float()).reshape(a.shape[0], -1, a.shape[-1]).sum(1)
    kernel, stride, dilation = _conv2d_args(module)
    ap = _padded(module, a)
    w2 = w.unsqueeze(2) if isinstance(module, nn.Conv1d) else w
    b2 = b.unsqueeze(2) if isinstance(module, nn.Conv1d) else b
    gi = torch.nn.grad.conv2d_input(ap.shape, w2, b2, stride, 0, dilation, module.groups)
    full = (ap.float() * gi.float()).sum((2, 3))  # (m, C_in)
    return full.reshape(a.shape[0], module.groups, -1).sum(1)


def _modules(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    mods = dict(model.named_modules())
    out = {}
    for n in names:
        if not isinstance(mods.get(n), KINDS):
            kind = type(mods[n]).__name__ if n in mods else "missing"
            raise HessianError(f"module {n!r} ({kind}): the MC estimator handles Conv1d, Conv2d "
                               "and Linear; use estimator='ggn' or leave it out of names")
        out[n] = mods[n]
    return out


def _draw_passes(model, x, u, hooks: _Hooks, autocast, scale: float):
    """One forward of ``x``; per row of ``u`` (draws, m) one backward pass with labels drawn
    from the softmax. Yields ``hooks.out`` per draw."""
    leaf = x.detach().requires_grad_(True) if x.is_floating_point() else x
    with (autocast or nullcontext)():
        out = model(leaf)
    if not torch.is_tensor(out) or out.dim() != 2:
        raise HessianError("the MC estimator needs (N, classes) logits; "
                           f"the model returned {getattr(out, 'shape', type(out))}")
    logits = out.float()
    targets = [leaf] if leaf.requires_grad else [p for p in model.parameters() if p.requires_grad]
    if not targets:
        raise HessianError("integer inputs: the MC estimator needs the estimated weights to "
                           "require grad")
    prob = logits.detach().softmax(-1)  # (m, C)
    cdf = prob.cumsum(-1)
    for d in range(u.shape[0]):
        y = torch.searchsorted(cdf, u[d].to(cdf.device)[:, None] * cdf[:, -1:]).clamp_max(prob.shape[1] - 1)
        cot = prob.scatter_add(1, y, torch.full_like(y, -1.0, dtype=prob.dtype))  # p − e_ŷ
        hooks.out = {}
        torch.autograd.grad(logits, targets, cot * scale, retain_graph=d < u.shape[0] - 1)
        yield hooks.out


def _micro(lo: int, hi: int, chunk: int | None):
    step = chunk or (hi - lo) or 1
    return [(i, min(i + step, hi)) for i in range(lo, hi, step)]


def mc_channel_traces(
    model: nn.Module,
    names: Sequence[str],
    xs: Sequence[torch.Tensor],
    draws: int,
    seed: int,
    *,
    chunk: int | None = None,
    autocast: Callable | None = None,
    scale: float = 1.0,
    part: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Per draw, ``1/N Σ_n ‖(g_n)_c‖² / scale²`` for every output channel of the ``names``
    modules, averaged over the batches ``xs``: ``(draws, total channels)`` fp32, one row per
    draw of a label for every sample. Their mean is unbiased for ``Tr(G_c)``.

    ``chunk``: samples per forward/backward (memory bound; default the whole batch).
    ``part=(r, w)``: only that share of every batch's samples (still divided by the whole
    batch's size), so the rows of all parts sum to the whole estimate. ``scale``: multiplies
    the cotangents (fp16 loss scaling); a non-finite result is the caller's to redo.
    """
    mods = _modules(model, names)
    noise = label_noise(seed, draws, [len(x) for x in xs])
    widths = {n: m.out_features if isinstance(m, nn.Linear) else m.out_channels for n, m in mods.items()}
    device = next(model.parameters()).device
    rows = torch.zeros(draws, sum(widths.values()), device=device)
    zero = {n: torch.zeros(1, c, device=device) for n, c in widths.items()}  # outputs the loss ignores
    with _Hooks(mods, channel_sq_norms, linear=False) as hooks:
        for x, u in zip(xs, noise, strict=True):
            lo, hi = share(len(x), part)
            for a, b in _micro(lo, hi, chunk):
                hooks.calls = {}
                for d, got in enumerate(_draw_passes(model, x[a:b], u[:, a:b], hooks, autocast, scale)):
                    rows[d] += torch.cat([got.get(n, zero[n]).sum(0) for n in mods]) / len(x)
    return rows / (len(xs) * scale**2)


def mc_removal(
    model: nn.Module,
    slices: dict[str, list[tuple[int, torch.Tensor]]],
    sizes: dict[int, int],
    xs: Sequence[torch.Tensor],
    draws: int,
    seed: int,
    *,
    chunk: int | None = None,
    autocast: Callable | None = None,
    part: tuple[int, int] | None = None,
) -> dict[int, torch.Tensor]:
    """Monte-Carlo ``Q`` of :func:`ehap_fx.scoring.ggn.ggn_removal` (same ``slices``/``sizes``; module
    names as keys): ``½ · 1/N Σ_n mean_draws v_n v_nᵀ`` with ``v_n`` the per-sample
    derivatives along each key's channels, averaged over ``xs``. ``part`` as in
    :func:`mc_channel_traces`."""
    mods = _modules(model, list(slices))
    device = next(model.parameters()).device
    maps = []  # (module, key, 0/1 map from the weight's dim-1 entries to the key's channels)
    for n, entries in slices.items():
        width = mods[n].weight.shape[1]
        for key, index in entries:
            m = torch.zeros(sizes[key], width, device=device)
            m[torch.arange(sizes[key], device=device)[:, None].expand_as(index), index.to(device)] = 1
            maps.append((n, key, m))
    joint = {k: torch.zeros(s, s, device=device) for k, s in sizes.items()}
    noise = label_noise(seed, draws, [len(x) for x in xs])
    with _Hooks(mods, input_directional, linear=True) as hooks:
        for x, u in zip(xs, noise, strict=True):
            lo, hi = share(len(x), part)
            for a, b in _micro(lo, hi, chunk):
                hooks.calls = {}
                for got in _draw_passes(model, x[a:b], u[:, a:b], hooks, autocast, 1.0):
                    acc: dict[int, torch.Tensor] = {}
                    for n, key, m in maps:
                        if n not in got:  # an output the loss ignores: no derivative
                            continue
                        v = got[n] @ m.T  # (m, size)
                        acc[key] = v if key not in acc else acc[key] + v
                    for key, v in acc.items():
                        joint[key] += v.T @ v / (len(x) * draws)
    return {k: 0.5 * q / len(xs) for k, q in joint.items()}


class ReduceSize:
    """Forward hooks that record, from the shapes one forward sees, the largest per-layer
    reduction buffer of the MC pass per sample (elements: unfolded input plus per-sample
    weight gradient or Gram matrix), without computing it. Use as a context manager."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        mods = dict(model.named_modules())
        self.modules = [mods[n] for n in names if isinstance(mods.get(n), KINDS)]
        self.worst = 0
        self.handles = []

    def __enter__(self) -> ReduceSize:
        self.handles = [m.register_forward_hook(self._hook) for m in self.modules]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()

    def _hook(self, module, args, output) -> None:
        m = args[0].shape[0]
        if isinstance(module, nn.Linear):
            g, c, k, t = 1, module.out_features, module.in_features, output.numel() // (m * output.shape[-1])
        else:
            g, c = module.groups, module.out_channels
            k = module.in_channels // g * math.prod(module.kernel_size)
            t = output[0, 0].numel()
        gram = _gram_is_cheaper(g, c, k, t)
        self.worst = max(self.worst, g * k * t + (g * t * t if gram else c * k))
