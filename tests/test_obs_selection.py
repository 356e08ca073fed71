"""tools/obs_selection.py: the greedy structured-OBS costs equal the least-squares refit's
residuals computed independently (``torch.linalg.lstsq``), weighted as the tool weights them."""

import sys
from pathlib import Path

import pytest
import torch
from ehap_fx.passes.group import group_channels, groups_of
from ehap_fx.passes.trace import trace
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import obs_selection as obs  # noqa: E402


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double().eval()


def _refit_error(x: torch.Tensor, w: torch.Tensor, gone: list[int]) -> torch.Tensor:
    """Per output, the mean squared residual of the best weights on the columns left."""
    keep = [i for i in range(x.shape[1]) if i not in gone]
    y = x @ w.T
    fit = torch.linalg.lstsq(x[:, keep], y).solution
    return (x[:, keep] @ fit - y).square().mean(0)


def test_greedy_obs_costs_are_the_lstsq_refit_errors():
    model = _net()
    batches = [torch.randn(64, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    gm = group_channels(trace(model, batches[0][:1])).graph_module
    (group,) = groups_of(gm).prunable  # the 8 hidden channels, read by the second linear
    states = obs.consumer_states(gm, batches, damping=0.0)
    (name,) = states
    consumer = states[name]
    with torch.no_grad():
        x = torch.relu(torch.cat(batches) @ model[0].weight.T + model[0].bias)  # the consumer's inputs
    w = model[2].weight.detach()
    torch.testing.assert_close(consumer.h, x.T @ x / len(x))

    ranking = obs.obs_ranking(gm, batches, damping=0.0)
    order = ranking.choose[group.id].argsort().tolist()  # removal order: choose is the greedy position
    first = [float((consumer.weight * _refit_error(x, w, [c])).sum()) for c in range(group.size)]
    assert order[0] == min(range(group.size), key=first.__getitem__)
    ulp = 2.0**-23  # the scores are float32: the two float64 paths agree to far less than one ulp
    assert float(ranking.scores[group.id][order[0]]) == pytest.approx(min(first), rel=2 * ulp)
    # the second step's marginal cost: the refit without both, less the refit without the first
    second = float((consumer.weight * (_refit_error(x, w, order[:2]) - _refit_error(x, w, order[:1]))).sum())
    assert float(ranking.scores[group.id][order[1]]) == pytest.approx(max(second, min(first)), rel=2 * ulp)
    assert ranking.per_cost and ranking.whole[group.id] > 0


def test_repair_fraction_is_the_refit_error_over_the_zeroing_error():
    """``removal*obs``'s factor: per channel of a one-consumer group, the loss-weighted error the
    lstsq refit leaves over the error of zeroing the channel alone (``(x_c w_c)²``)."""
    model = _net()
    batches = [torch.randn(64, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    gm = group_channels(trace(model, batches[0][:1])).graph_module
    (group,) = groups_of(gm).prunable
    (consumer,) = obs.consumer_states(gm, batches, damping=0.0).values()
    with torch.no_grad():
        x = torch.relu(torch.cat(batches) @ model[0].weight.T + model[0].bias)
    w = model[2].weight.detach()
    fraction = obs.repair_fraction(gm, batches, damping=0.0)[group.id]
    for c in range(group.size):
        zero = (x[:, c : c + 1] * w[:, c]).square().mean(0)  # (O,): output error of zeroing c
        want = float((consumer.weight * _refit_error(x, w, [c])).sum() / (consumer.weight * zero).sum())
        assert float(fraction[c]) == pytest.approx(want, rel=1e-6)
    assert (fraction <= 1).all()
