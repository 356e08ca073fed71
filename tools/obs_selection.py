"""Selection that knows about the repair (issue #25, item 2): structured OBS scores, held
against the removal criterion and L1 by ``tools/post_training.py --scorers obs removal+obs
removal*obs``.

``passes.compensate`` refits every consumer of a pruned group by least squares, so what a
channel costs is not the error of zeroing it but the error left *after* that refit. For one
consumer (a conv/linear reading the group), with ``H = E[xxᵀ]`` over its im2col inputs on the
dense model and ``Q`` the columns of channel ``c``, structured Optimal Brain Surgeon (OBC,
ZipLM) gives the error of output ``o`` left after the optimal update of the other columns::

    ε_o(Q) = w_{o,Q} [(H⁻¹)_{QQ}]⁻¹ w_{o,Q}ᵀ      (zeroing alone: w_{o,Q} H_{QQ} w_{o,Q}ᵀ)

and removing ``Q`` updates ``W ← W − W_{:,Q} [(H⁻¹)_{QQ}]⁻¹ (H⁻¹)_{Q,:}`` and ``H⁻¹`` by the same
downdate, so channels are taken greedily, one at a time, each at its marginal cost. The error
is put in loss units with the diagonal Fisher of the consumer's output (``F_o``: the mean
squared gradient of the loss per output element, labels drawn from the model's own softmax, no
labels read): ``ΔL ≈ ½ · positions · Σ_o F_o ε_o``, summed over the group's consumers.

Three selections from it:

* ``obs``: the greedy marginal costs as the scores (allocation and choice both OBS);
* ``removal+obs``: the removal criterion's scores set how many channels each group keeps, the
  OBS greedy order chooses which (``Ranking.choose``);
* ``removal*obs``: the removal criterion's scores times the fraction of a channel's error the
  refit leaves (``Σ F ε_OBS / Σ F ε_zero``) in groups with one consumer.

Measured on ResNet-56 (docs/results.md, "Post-training pruning"): none beats the removal
criterion after the repair; the sums over a residual stream's consumers miss the cross terms
that make a stream channel expensive (the removal criterion keeps them), so ``obs`` prunes the
streams and loses. That is why this lives in ``tools/``, not in ``ehap_fx.scoring``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from ehap_fx.passes.compensate import columns, layer_of
from ehap_fx.passes.group import groups_of
from torch import fx

from ehap_fx.data import OwnLabels
from ehap_fx.scoring import Ranking
from ehap_fx.scoring.removal import consumer_slices


@dataclass
class Consumer:
    """One consumer's OBS state: ``h`` and ``hinv`` (damped), its weight as ``(O, K)``, the
    columns per input channel (``kk``) and the loss weight of each output's squared error."""

    h: torch.Tensor
    hinv: torch.Tensor
    w: torch.Tensor
    kk: int
    weight: torch.Tensor


def consumer_states(gm: fx.GraphModule, batches: list[torch.Tensor], damping: float = 1e-3
                    ) -> dict[str, Consumer]:
    """``H`` and the output Fisher of every consumer of a prunable group, on ``batches`` (one
    forward+backward each, labels drawn from the model's own softmax)."""
    cons = consumer_slices(groups_of(gm).prunable)
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    layers = {name: layer_of(gm, nodes[name]) for name in cons}
    h = dict.fromkeys(cons, 0.0)
    rows = dict.fromkeys(cons, 0)
    g2 = dict.fromkeys(cons, 0.0)
    g_rows = dict.fromkeys(cons, 0)
    labelled = list(OwnLabels(batches, gm))  # before the hooks: the labels' forward is not counted

    def hook(name):
        def forward(module, inputs, out):
            layer = layers[name]
            cols = columns(layer, inputs[0].detach())  # (rows, groups, K)
            cols = cols.reshape(len(cols), -1).double()
            h[name] = h[name] + cols.T @ cols
            rows[name] += len(cols)

            def backward(grad):
                g = grad.detach().double()
                g = g.transpose(1, -1).reshape(-1, g.shape[1]) if layer.conv else g.reshape(-1, g.shape[-1])
                g2[name] = g2[name] + g.square().sum(0)
                g_rows[name] += len(g)

            if out.requires_grad:
                out.register_hook(backward)
        return forward

    requires = {p: p.requires_grad for p in gm.parameters()}
    handles = [gm.get_submodule(name).register_forward_hook(hook(name)) for name in cons]
    training = gm.training
    try:
        gm.eval()
        for p in gm.parameters():
            p.requires_grad_(True)
        for x, y in labelled:
            F.cross_entropy(gm(x), y, reduction="sum").backward()  # per-sample gradients, summed
    finally:
        for handle in handles:
            handle.remove()
        for p, r in requires.items():
            p.requires_grad_(r)
        gm.zero_grad(set_to_none=True)
        gm.train(training)
    images = sum(len(b) for b in batches)
    states = {}
    for name, layer in layers.items():
        if layer.groups != 1:
            raise NotImplementedError(f"{name}: grouped consumers are not handled by this tool")
        hm = h[name] / rows[name]
        hinv = torch.linalg.inv(hm + damping * hm.diagonal().mean() * torch.eye(len(hm), dtype=hm.dtype))
        w = layer.weight.detach().double().reshape(layer.weight.shape[0], -1)
        kk = layer.weight[0, 0].numel() if layer.conv else 1
        states[name] = Consumer(hm, hinv, w, kk, 0.5 * rows[name] / images * g2[name] / g_rows[name])
    return states


def _readers(gm: fx.GraphModule):
    """Each prunable group with its consumers: ``(group, [(module name, index), ...])``."""
    groups = groups_of(gm).prunable
    cons = consumer_slices(groups)
    for g in groups:
        yield g, [(name, idx) for name, lst in cons.items() for gid, idx in lst if gid == g.id]


def _blocks(index: torch.Tensor, kk: int) -> torch.Tensor:
    """``(size, k·kk)`` weight columns of each group channel (its ``k`` input channels' taps)."""
    taps = torch.arange(kk)
    return (index.long()[:, :, None] * kk + taps).reshape(len(index), -1)


def _obs_errors(c: Consumer, q: torch.Tensor) -> torch.Tensor:
    """Loss-weighted error left after removing each candidate column block ``q[a]`` alone."""
    block = torch.linalg.inv(c.hinv[q[:, :, None], q[:, None, :]])  # (A, b, b)
    wq = c.w[:, q]  # (O, A, b)
    return torch.einsum("oai,aij,oaj,o->a", wq, block, wq, c.weight)


def obs_ranking(gm: fx.GraphModule, batches: list[torch.Tensor], damping: float = 1e-3) -> Ranking:
    """``obs``: each group's channels removed greedily by marginal OBS cost (summed over its
    consumers); scores are those costs made non-decreasing along the greedy order, ``choose``
    the order itself (per unit of cost saved, like the removal criterion's loss units)."""
    states = consumer_states(gm, batches, damping)
    scores, choose, whole = {}, {}, {}
    for g, readers in _readers(gm):
        mine = [(name, _blocks(idx, states[name].kk)) for name, idx in readers]
        local = {name: replace(states[name], hinv=states[name].hinv.clone(), w=states[name].w.clone())
                 for name, _ in mine}
        alive, order, costs = list(range(g.size)), [], []
        while alive:
            total = sum(_obs_errors(local[name], q[alive]) for name, q in mine)
            j = int(torch.argmin(total))
            order.append(alive.pop(j))
            costs.append(float(total[j]))
            for name, q in mine:  # remove the chosen block: update W and H⁻¹ (OBS)
                c, cols = local[name], q[order[-1]]
                block = torch.linalg.inv(c.hinv[cols][:, cols])
                c.w -= c.w[:, cols] @ block @ c.hinv[cols, :]
                c.hinv -= c.hinv[:, cols] @ block @ c.hinv[cols, :]
        marginal = torch.tensor(costs).cummax(0).values.float()
        scores[g.id] = torch.zeros(g.size).index_put_((torch.tensor(order),), marginal)
        choose[g.id] = torch.zeros(g.size).index_put_((torch.tensor(order),), torch.arange(g.size).float())
        whole[g.id] = float(sum(costs))
    return Ranking(scores, whole=whole, per_cost=True, choose=choose, summary={"scorer": "obs"})


def repair_fraction(gm: fx.GraphModule, batches: list[torch.Tensor], damping: float = 1e-3
                    ) -> dict[int, torch.Tensor]:
    """Per channel of a group with one consumer: the loss-weighted error OBS leaves after the
    refit over the error of zeroing it (1 for groups with several consumers)."""
    states = consumer_states(gm, batches, damping)
    out = {}
    for g, mine in _readers(gm):
        if len(mine) != 1:
            out[g.id] = torch.ones(g.size)
            continue
        c = states[mine[0][0]]
        q = _blocks(mine[0][1], c.kk)
        wq = c.w[:, q]
        zero = torch.einsum("oai,aij,oaj,o->a", wq, c.h[q[:, :, None], q[:, None, :]], wq, c.weight)
        out[g.id] = (_obs_errors(c, q) / zero.clamp_min(1e-300)).float()
    return out
