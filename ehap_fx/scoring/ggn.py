"""Gauss-Newton pieces of the Hessian of softmax cross-entropy, per output channel.

For ``L = mean_n CE(f(x_n), y_n)`` the Hessian splits into ``H = G + R`` with the generalized
Gauss-Newton matrix ``G = 1/N Σ_n J_nᵀ (diag p_n − p_n p_nᵀ) J_n`` and a residual ``R`` made of
the second derivatives of the network itself. Writing ``diag p − p pᵀ = A Aᵀ`` with
``A = diag(√p) − p √pᵀ`` gives the exact trace of every channel's block of ``G``::

    Tr(G_c) = 1/N Σ_n Σ_k ‖(J_nᵀ a_nk)_c‖²        (a_nk: column k of A_n)

i.e. N·C per-sample gradients, squared and summed per channel: no sampling noise.

For a piecewise-linear network (ReLU, max/avg pooling, eval-mode BatchNorm, conv, linear,
residual adds) the output is linear in each single layer's weights, so that layer's diagonal
block of ``R`` is zero and ``Tr(G_c) = Tr(H_c)`` exactly. For smooth activations it is not;
``ggn_vector_product`` gives ``G v`` so Hutchinson can estimate ``Tr(R_c)`` as a control variate.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, jvp, vjp, vmap
from torch.utils._pytree import tree_map

Params = dict[str, torch.Tensor]


def _split_params(model: nn.Module, names: list[str]) -> tuple[Params, Params]:
    """Selected weights (by parameter name) and every other parameter/buffer, detached."""
    selected = {n: p.detach() for n, p in model.named_parameters() if n in names}
    fixed = {n: p.detach() for n, p in model.named_parameters() if n not in names}
    fixed.update(dict(model.named_buffers()))
    return selected, fixed


def _channel_sq_sum(g: torch.Tensor) -> torch.Tensor:
    """Σ over each output channel of ``g**2`` for a batch: (B, C, ...) -> (C,) in fp32."""
    return g.float().pow(2).flatten(2).sum(dim=(0, 2))


def _ggn_sample_mean(
    model: nn.Module,
    names: list[str],
    x: torch.Tensor,
    chunk: int,
    autocast: Callable | None,
    reduce: Callable,
):
    """Mean over the samples of ``x`` of ``reduce(grads, weights)``, where ``grads[name]`` is
    ``(C, *w.shape)``: the per-sample gradients ``J_nᵀ a_nk`` of the C columns of ``A_n``
    (vmapped ``chunk`` samples at a time). ``reduce`` returns a pytree of tensors."""
    selected, fixed = _split_params(model, names)
    ctx = autocast or _null

    def logits(p: Params, x1: torch.Tensor) -> torch.Tensor:
        with ctx():
            return functional_call(model, (p, fixed), (x1.unsqueeze(0),)).squeeze(0).float()

    def per_sample(x1: torch.Tensor):
        out, vjp_fn = vjp(lambda p: logits(p, x1), selected)
        prob = out.detach().softmax(-1)  # (C,)
        sq = prob.sqrt()
        a = torch.diag(sq) - prob[:, None] * sq[None, :]  # (C, C); columns a_k
        (grads,) = vmap(vjp_fn)(a.T.contiguous())  # dict of (C, *w.shape)
        return reduce(grads, selected)

    batched = vmap(per_sample)
    total = None
    for start in range(0, x.shape[0], chunk):
        part = tree_map(lambda t: t.sum(0), batched(x[start : start + chunk]))
        total = part if total is None else tree_map(torch.add, total, part)
    return tree_map(lambda t: t / x.shape[0], total)


def ggn_channel_traces(
    model: nn.Module,
    names: list[str],
    x: torch.Tensor,
    chunk: int = 8,
    autocast: Callable | None = None,
) -> list[torch.Tensor]:
    """Exact ``Tr(G_c)`` of mean softmax cross-entropy for every output channel.

    ``names`` are parameter names (``"conv1.weight"``); returns one fp32 ``(C_out,)`` tensor per
    name, summed over the batch ``x`` and divided by its size. The labels do not enter the GGN.
    """
    return _ggn_sample_mean(
        model, names, x, chunk, autocast, lambda grads, _: [_channel_sq_sum(grads[n]) for n in names]
    )


def ggn_vector_product(
    model: nn.Module,
    names: list[str],
    x: torch.Tensor,
    vs: list[torch.Tensor],
    autocast: Callable | None = None,
) -> list[torch.Tensor]:
    """``G v`` for mean softmax cross-entropy: a forward-mode ``J v`` and one ``vjp``."""
    selected, fixed = _split_params(model, names)
    ctx = autocast or _null
    tangents = {n: v.to(selected[n].dtype) for n, v in zip(names, vs, strict=True)}

    def logits(p: Params) -> torch.Tensor:
        with ctx():
            return functional_call(model, (p, fixed), (x,)).float()

    out, jv = jvp(logits, (selected,), (tangents,))  # (N, C) each
    prob = out.softmax(-1)
    u = prob * jv - prob * (prob * jv).sum(-1, keepdim=True)  # (diag p − p pᵀ) J v
    _, vjp_fn = vjp(logits, selected)
    (gv,) = vjp_fn(u / x.shape[0])
    return [gv[n] for n in names]


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def ggn_removal(
    model: nn.Module,
    slices: dict[str, list[tuple[int, torch.Tensor]]],
    sizes: dict[int, int],
    x: torch.Tensor,
    chunk: int = 8,
    autocast: Callable | None = None,
) -> dict[int, torch.Tensor]:
    """``½ δᵀGδ`` of mean softmax cross-entropy for zeroing any subset of input-channel slices.

    ``slices[param name]`` lists ``(key, index)``: entry ``c`` of ``key`` zeroes input channels
    ``index[c]`` (dim 1 of that weight, ``index`` shaped ``(sizes[key], k)``) of every listed
    weight at once. Returns, averaged over ``x``, one fp32 ``(sizes[key], sizes[key])`` matrix
    ``Q`` per key: zeroing the entries of a set ``S`` changes the loss by ``1_Sᵀ Q 1_S`` (its
    diagonal: each entry alone; its sum: the whole key, cross terms included).
    """
    names = list(slices)
    widths = {n: p.shape[1] for n, p in model.named_parameters() if n in slices}
    # 0/1 maps from a weight's input channels to each key's channels (duplicates counted once)
    maps = []
    for n in names:
        for key, index in slices[n]:
            m = torch.zeros(sizes[key], widths[n], device=x.device)
            m[torch.arange(sizes[key], device=x.device)[:, None].expand_as(index), index.to(x.device)] = 1
            maps.append((n, key, m))

    def reduce(grads, weights) -> dict[int, torch.Tensor]:
        # derivative along "scale input channel i of w": <W[:, i], grad[:, i]>  -> (C, in)
        per_in = {
            n: (grads[n].float() * weights[n].float()).transpose(1, 2).flatten(2).sum(-1) for n in names
        }
        acc = {key: 0 for key in sizes}
        for n, key, m in maps:
            acc[key] = acc[key] + per_in[n] @ m.T  # (C, size)
        return {key: v.T @ v for key, v in acc.items()}

    joint = _ggn_sample_mean(model, names, x, chunk, autocast, reduce)
    return {key: 0.5 * v for key, v in joint.items()}
