"""BatchNorm folding for the Hessian estimators: an exact reparametrisation that saves every
probe its BN forward, backward and double backward (``HessianOptions.fold_bn``)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
from torch import fx, nn


def fold_batchnorm(work: nn.Module, names: Sequence[str]) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Fold every eval-mode BatchNorm that alone consumes one of the ``names`` convs into it.

    ``BN(conv(x, w)) = conv(x, s·w) + b'`` with ``s = γ/√(σ²+ε)`` per output channel, an exact
    reparametrisation: ``H_w = S H_{s·w} S``, so probes and traces are mapped back by ``s``
    and every estimate is the one of the original weights. Returns the (traced) model and
    ``s`` per folded conv; a model that ``torch.fx`` cannot trace is returned unfolded.
    """
    if not isinstance(work, fx.GraphModule):
        try:
            work = fx.symbolic_trace(work)
        except Exception:  # noqa: BLE001 - folding is an optimisation, never a requirement
            return work, {}
    modules = dict(work.named_modules())
    calls = Counter(n.target for n in work.graph.nodes if n.op == "call_module")
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    scales = {}
    for node in list(work.graph.nodes):
        if node.op != "call_module" or node.target not in names or calls[node.target] != 1:
            continue
        conv = modules[node.target]
        users = list(node.users)
        if not isinstance(conv, convs) or len(users) != 1 or users[0].op != "call_module":
            continue
        bn_node = users[0]
        bn = modules[bn_node.target]
        if (not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_var is None
                or calls[bn_node.target] != 1 or bn_node.args[0] is not node or len(bn_node.args) != 1):
            continue
        with torch.no_grad():
            s = (bn.running_var + bn.eps).rsqrt()
            if bn.affine:
                s = s * bn.weight
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            shift = (bias - bn.running_mean) * s + (bn.bias if bn.affine else 0.0)
            conv.weight.mul_(s.reshape(-1, *[1] * (conv.weight.dim() - 1)))
            conv.bias = nn.Parameter(shift)
        bn_node.replace_all_uses_with(node)
        work.graph.erase_node(bn_node)
        scales[node.target] = s.detach().float().clone()
    work.graph.lint()
    work.recompile()
    return work, scales


def scale_channels(ts: list[torch.Tensor], fold: list[torch.Tensor | None], out: bool) -> list[torch.Tensor]:
    """Multiply each ``(P, C_out, ...)`` tensor by its weight's BN scale per output channel:
    probes going into the folded model (in their dtype), or products coming out (in fp32)."""
    res = []
    for t, k in zip(ts, fold, strict=True):
        if k is not None:
            k = k.reshape(1, -1, *[1] * (t.dim() - 2))
            t = t.float() * k if out else t * k.to(t.dtype)
        res.append(t)
    return res
