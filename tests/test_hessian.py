"""Per-channel Hessian traces against exact ones from ``torch.func.hessian``.

Model under test (tiny enough for the full Hessian, 174 weights)::

    x (N,2,4,4) -> conv a (2->3, 3x3) -> BN -> act -> conv b (3->4, 3x3) -> act
                -> avgpool -> flatten -> linear c (4->3) -> logits (N,3)

``act`` is ReLU (piecewise linear: each layer's diagonal Hessian block equals its GGN block)
or Tanh (it does not).
"""

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from ehap_fx.passes.group import ChannelGroup, Member
from torch import nn
from torch.func import functional_call, hessian, jacrev

from ehap_fx.errors import HessianError
from ehap_fx.scoring.hessian import estimate_hessian, group_sensitivity, group_stderr
from ehap_fx.scoring.options import HessianOptions
from ehap_fx.scoring.sampling import draw_batches
from ehap_fx.scoring.setup import resolve_dtype

NAMES = ["a", "b", "c"]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(act=nn.ReLU) -> nn.Module:
    torch.manual_seed(1)
    net = nn.Sequential()
    net.add_module("a", nn.Conv2d(2, 3, 3, padding=1))
    net.add_module("bn", nn.BatchNorm2d(3))
    net.add_module("act1", act())
    net.add_module("b", nn.Conv2d(3, 4, 3, padding=1))
    net.add_module("act2", act())
    net.add_module("pool", nn.AdaptiveAvgPool2d(1))
    net.add_module("flat", nn.Flatten())
    net.add_module("c", nn.Linear(4, 3))
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.2, 0.2)
        net.bn.running_var.uniform_(0.5, 1.5)
        for m in (net.a, net.b, net.c):
            m.weight.mul_(2.0)
    return net.eval()


def data(n=16):
    g = torch.Generator().manual_seed(2)
    return torch.randn(n, 2, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def _weights(net):
    return {f"{n}.weight": getattr(net, n).weight.detach() for n in NAMES}


def _fixed(net, weights):
    fixed = {k: v for k, v in net.named_parameters() if k not in weights}
    fixed.update(dict(net.named_buffers()))
    return fixed


def exact_traces(net, x, y):
    """Exact Tr(H_c) per output channel of each weight, from the full Hessian."""
    w = _weights(net)
    fixed = _fixed(net, w)

    def loss(p):
        return F.cross_entropy(functional_call(net, (p, fixed), (x,)), y)

    h = hessian(loss)(w)
    out = {}
    for n in NAMES:
        k = f"{n}.weight"
        c = w[k].shape[0]
        block = h[k][k].reshape(c, -1, c, w[k][0].numel())  # (C, p, C, p)
        out[n] = torch.einsum("cici->c", block)
    return out


def exact_ggn_traces(net, x):
    """Exact Tr(G_c) = 1/N Σ_n Σ_i (J_nᵀ (diag p − p pᵀ) J_n)_ii over channel c."""
    w = _weights(net)
    fixed = _fixed(net, w)
    logits = functional_call(net, (w, fixed), (x,))
    p = logits.softmax(-1)
    h_out = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # (N, C, C)
    jac = jacrev(lambda q: functional_call(net, (q, fixed), (x,)))(w)
    out = {}
    for n in NAMES:
        j = jac[f"{n}.weight"].flatten(3)  # (N, K, C_out, p)
        out[n] = torch.einsum("nkcp,nkl,nlcp->c", j, h_out, j) / x.shape[0]
    return out


def opts(**kw):
    base = dict(batch_size=16, progress=False, seed=0)
    base.update(kw)
    return HessianOptions(**base)


@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh], ids=["relu", "tanh"])
def test_ggn_equals_exact_ggn(act):
    net = tiny(act)
    x, y = data()
    r = estimate_hessian(net, (x, y), opts(estimator="ggn", dtype="fp32"), names=NAMES)
    ref = exact_ggn_traces(net, x)
    for n in NAMES:
        torch.testing.assert_close(r.traces[n], ref[n], rtol=1e-5, atol=1e-7)
        assert (r.stderr[n] == 0).all()
    assert r.probes == 0


def test_ggn_equals_exact_hessian_for_relu_network():
    net = tiny(nn.ReLU)
    x, y = data()
    r = estimate_hessian(net, (x, y), opts(estimator="ggn", dtype="fp32"), names=NAMES)
    ref = exact_traces(net, x, y)
    for n in NAMES:
        torch.testing.assert_close(r.traces[n], ref[n], rtol=1e-5, atol=1e-7)


def test_tanh_network_hessian_differs_from_ggn():
    net = tiny(nn.Tanh)
    x, y = data()
    h, g = exact_traces(net, x, y), exact_ggn_traces(net, x)
    gap = max((h[n] - g[n]).abs().max().item() for n in ["a", "b"])
    assert gap > 1e-3  # so the hybrid test below is not trivially the GGN test


def _within(r, ref, rel=0.0, k=5.0):
    for n in NAMES:
        err = (r.traces[n] - ref[n]).abs()
        bound = k * r.stderr[n] + rel * ref[n].abs() + 1e-4
        assert (err <= bound).all(), (n, r.traces[n], ref[n], r.stderr[n])
    scale = max(ref[n].abs().max() for n in NAMES)
    assert all((r.stderr[n] < 0.1 * scale).all() for n in NAMES)  # enough probes to mean it


@pytest.mark.parametrize(("dtype", "rel"), [("fp32", 0.0), ("bf16", 0.03), ("fp16", 0.01)])
def test_hutchinson_converges_to_exact_traces(dtype, rel):
    net = tiny(nn.Tanh)
    x, y = data()
    r = estimate_hessian(net, (x, y), opts(estimator="hutchinson", dtype=dtype, probes=1500,
                                           probe_batch=50), names=NAMES)
    assert r.probes == 1500 and r.dtype == dtype
    _within(r, exact_traces(net, x, y), rel=rel)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_hybrid_is_unbiased(dtype):
    """Exact Tr(G_c) + Hutchinson on H − G: centred on Tr(H_c) although Tr(G_c) is not."""
    net = tiny(nn.Tanh)
    x, y = data()
    hyb = estimate_hessian(net, (x, y), opts(estimator="hybrid", dtype=dtype, probes=600,
                                             probe_batch=50), names=NAMES)
    _within(hyb, exact_traces(net, x, y), rel=0.03 if dtype == "bf16" else 0.0)
    ggn = exact_ggn_traces(net, x)
    for n in NAMES:
        torch.testing.assert_close(hyb.ggn[n], ggn[n], rtol=0.02 if dtype == "bf16" else 1e-5,
                                   atol=1e-4)


def test_probe_batching_and_forward_over_reverse_give_the_same_probes():
    net = tiny(nn.Tanh)
    x, y = data()
    base = estimate_hessian(net, (x, y), opts(estimator="hutchinson", dtype="fp32", probes=12),
                            names=NAMES)
    for kw in (dict(probe_batch=5), dict(hvp="forward_over_reverse"), dict(channels_last=True)):
        r = estimate_hessian(net, (x, y), opts(estimator="hutchinson", dtype="fp32", probes=12,
                                               **kw), names=NAMES)
        torch.testing.assert_close(r.probe_traces, base.probe_traces, rtol=1e-4, atol=1e-6)


def test_seed_determinism():
    net = tiny(nn.Tanh)
    x, y = torch.randn(40, 2, 4, 4), torch.randint(0, 3, (40,))
    run = [estimate_hessian(net, (x, y), opts(estimator="hutchinson", dtype="fp32", probes=6,
                                              seed=s), names=NAMES) for s in (3, 3, 4)]
    assert torch.equal(run[0].probe_traces, run[1].probe_traces)
    assert not torch.equal(run[0].probe_traces, run[2].probe_traces)


def test_forced_overflow_retries_and_unscales_exactly():
    net = tiny(nn.Tanh)
    x, y = data()
    plain = estimate_hessian(net, (x, y), opts(estimator="hutchinson", dtype="fp32", probes=8),
                             names=NAMES)
    # 2**140 overflows fp32 (max ~2**128): every scaled product is inf until the scale is
    # halved below ~2**120; power-of-two scales unscale exactly.
    big = estimate_hessian(net, (x, y), opts(estimator="hutchinson", dtype="fp32", probes=8,
                                             loss_scale=2.0**140, max_retries=60), names=NAMES)
    assert big.retries >= 12
    assert big.loss_scale <= 2.0**128
    torch.testing.assert_close(big.probe_traces, plain.probe_traces, rtol=1e-6, atol=0)


def test_retry_limit_is_a_clear_error():
    net = tiny(nn.Tanh)
    with pytest.raises(HessianError, match="overflow after 2 retries"):
        estimate_hessian(net, data(), opts(estimator="hutchinson", dtype="fp32", probes=2,
                                           loss_scale=2.0**200, max_retries=2), names=NAMES)


@pytest.mark.parametrize(("estimator", "first"), [("hutchinson", 2.0**200), ("mc", 2.0**196)])
def test_max_retries_means_that_many_halvings_after_the_first_try(estimator, first):
    """``max_retries=2``: a first try and two retries, each failure halving the scale, so the
    error names the scale after three halvings (the MC estimator starts at the scale over the
    batch, 2²⁰⁰ / 16: per-sample cotangents are N times the mean loss's)."""
    import re

    o = opts(estimator=estimator, dtype="fp32", probes=2, mc_samples=2, loss_scale=2.0**200, max_retries=2)
    with pytest.raises(HessianError, match=re.escape(f"overflow after 2 retries (loss scale {first / 8})")):
        estimate_hessian(tiny(), data(), o, names=NAMES)


def test_fp16_loss_scaling_rescues_underflowing_gradients():
    """1e-6 · CE: in fp16 without scaling the gradients underflow to (almost) zero."""
    net = tiny(nn.Tanh)
    x, y = data()

    def small(logits, target):
        return 1e-6 * F.cross_entropy(logits, target)

    def run(dtype, scale):
        return estimate_hessian(net, (x, y), opts(estimator="hutchinson", dtype=dtype,
                                                  probes=400, probe_batch=50, loss_scale=scale),
                                names=NAMES, loss_fn=small)

    ref, scaled, unscaled = run("fp32", None), run("fp16", None), run("fp16", 1.0)
    assert scaled.loss_scale == 2.0**16
    for n in NAMES:
        torch.testing.assert_close(scaled.traces[n], ref.traces[n], rtol=0.05, atol=1e-9)
    err = sum((unscaled.traces[n] - ref.traces[n]).abs().sum() for n in NAMES)
    total = sum(ref.traces[n].abs().sum() for n in NAMES)
    assert err > 0.5 * total


def test_stop_rule_converges_before_max_probes():
    net = tiny(nn.ReLU)
    x, y = data()
    r = estimate_hessian(net, (x, y), opts(estimator="hutchinson", dtype="fp32", min_probes=20,
                                           max_probes=2000, check_every=20, tol=0.05,
                                           rank_threshold=0.9), names=NAMES)
    assert r.converged and 20 < r.probes < 2000
    n, rel, rho = r.history[-1]
    assert n == r.probes and rel < 0.05 and rho >= 0.9


def test_draw_batches_exact_size_and_seeded():
    x, y = torch.arange(100.0)[:, None], torch.arange(100)
    a = draw_batches((x, y), 30, 2, seed=5)
    b = draw_batches(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y),
                                                 batch_size=7), 30, 2, seed=5)
    assert [len(t[0]) for t in a] == [30, 30]
    assert torch.equal(a[0][1], b[0][1]) and torch.equal(a[1][1], b[1][1])
    assert len(set(torch.cat([a[0][1], a[1][1]]).tolist())) == 60
    c = draw_batches(iter([(x[:50], y[:50]), (x[50:], y[50:])]), 30, 1, seed=5)
    assert len(c[0][0]) == 30
    # a plain list of batches is batches (1-D labels), not a dataset of two samples
    d = draw_batches([(x[:50], y[:50]), (x[50:], y[50:])], 30, 1, seed=5)
    assert torch.equal(d[0][1], c[0][1])
    samples = [(x[i], int(y[i])) for i in range(100)]  # a list of samples stays a dataset
    assert len(draw_batches(samples, 30, 2, seed=5)[1][0]) == 30
    with pytest.raises(HessianError, match="100 samples but batch_size"):
        draw_batches((x, y), 60, 2, seed=0)


def test_draw_batches_takes_exactly_all_the_samples_and_pools_no_more_batches_than_it_needs():
    """Data of exactly ``batch_size * n_batches`` samples is drawn whole (a permutation of it);
    a stream of batches is read only until it holds enough samples (a second batch would change
    the draw, and a stream may be long); no data at all is a ``HessianError``."""
    x, y = torch.arange(100.0)[:, None], torch.arange(100)
    whole = draw_batches((x, y), 50, 2, seed=1)
    assert sorted(torch.cat([b for _, b in whole]).tolist()) == list(range(100))

    def stream():
        yield x[:50], y[:50]
        raise AssertionError("a second batch was read")

    (first,) = draw_batches(stream(), 50, 1, seed=1)
    assert sorted(first[1].tolist()) == list(range(50))
    with pytest.raises(HessianError, match="has 0 samples"):
        draw_batches([], 1, 1, seed=0)
    with pytest.raises(HessianError, match="yielded no batches"):
        draw_batches(iter([]), 1, 1, seed=0)


def test_several_batches_average_the_hessian():
    net = tiny(nn.ReLU)
    x, y = torch.randn(32, 2, 4, 4), torch.randint(0, 3, (32,))
    r = estimate_hessian(net, (x, y), opts(estimator="ggn", dtype="fp32", n_batches=2),
                         names=NAMES)
    (x0, y0), (x1, y1) = draw_batches((x, y), 16, 2, seed=0)
    e0, e1 = exact_traces(net, x0, y0), exact_traces(net, x1, y1)
    for n in NAMES:
        torch.testing.assert_close(r.traces[n], (e0[n] + e1[n]) / 2, rtol=1e-5, atol=1e-7)


def test_hybrid_over_several_batches_subtracts_each_batchs_ggn_product():
    """Probing one layer of a ReLU network, whose block of the Hessian equals the GGN's (the
    output is piecewise linear in that layer's weights), every probe's residual v·(H − G)v is
    zero, so the hybrid is the exact mean trace over two batches, as over one: its control
    variate sums every batch's G·v. (Probing all layers jointly the residual is not zero: the
    cross-layer blocks of H and G differ even where the per-layer ones agree.)"""
    net = tiny(nn.ReLU)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(32, 2, 4, 4, generator=g), torch.randint(0, 3, (32,), generator=g)
    for name in ("b", "c"):
        r = estimate_hessian(net, (x, y), opts(estimator="hybrid", dtype="fp32", n_batches=2, probes=4),
                             names=[name])
        (x0, y0), (x1, y1) = draw_batches((x, y), 16, 2, seed=0)
        e0, e1 = exact_traces(net, x0, y0), exact_traces(net, x1, y1)
        torch.testing.assert_close(r.traces[name], (e0[name] + e1[name]) / 2, rtol=1e-5, atol=1e-6)


def test_group_sensitivity_sums_producers_and_k_indices():
    net = tiny(nn.Tanh)
    x, y = data()
    r = estimate_hessian(net, (x, y), opts(estimator="hutchinson", dtype="fp32", probes=30),
                         names=NAMES)
    s = r.sensitivity()
    # group 0: channels {a0+b1, a2+b(2,3)}; group 1: c (pinned members are still scored)
    g0 = ChannelGroup(0, 2, (
        Member("a", "a", "out", 0, torch.tensor([[0], [2]])),
        Member("b", "b", "out", 0, torch.tensor([[1, 1], [2, 3]])),
        Member("b", "b", "in", 1, torch.tensor([[0], [2]])),
    ))
    g1 = ChannelGroup(1, 3, (Member("c", "c", "out", 0, torch.arange(3)[:, None]),), "output")
    scores = group_sensitivity([g0, g1], r)
    want0 = torch.stack([s["a"][0] + 2 * s["b"][1], s["a"][2] + s["b"][2] + s["b"][3]])
    torch.testing.assert_close(scores[0], want0)
    torch.testing.assert_close(scores[1], s["c"])
    w = net.a.weight.detach()
    torch.testing.assert_close(s["a"], r.traces["a"] / 18 * w.pow(2).flatten(1).sum(1))
    se = group_stderr([g0, g1], r)
    rows = r.probe_traces[:, 7:10] * (r.weight_sq["c"] / 4)
    torch.testing.assert_close(se[1], rows.std(0) / 30**0.5)
    with pytest.raises(HessianError, match="module 'zz' has no Hessian trace"):
        group_sensitivity([ChannelGroup(2, 1, (Member("z", "zz", "out", 0,
                                                      torch.tensor([[0]])),))], r)


def test_two_probes_give_a_group_standard_error_and_the_summary_reports_each_field():
    """Two probes are enough for a spread (one is not: zero), ``std(rows) / √2`` of the group rows;
    ``summary()`` reports the result's own figures under their names, seconds to the millisecond."""
    net = tiny()
    r = estimate_hessian(net, data(), opts(estimator="hutchinson", dtype="fp32", probes=2), names=NAMES)
    g = ChannelGroup(1, 3, (Member("c", "c", "out", 0, torch.arange(3)[:, None]),), "output")
    rows = r.probe_traces[:, 7:10] * (r.weight_sq["c"] / 4)  # c: 4 weights per channel
    assert r.probes == 2 and (rows[0] != rows[1]).all()
    torch.testing.assert_close(group_stderr([g], r)[1], (rows[0] - rows[1]).abs() / 2)  # std of 2 = |a−b|/√2
    assert r.summary() == {"estimator": "hutchinson", "dtype": "fp32", "probes": 2, "retries": 0,
                           "loss_scale": 1.0, "converged": True, "seconds": round(r.seconds, 3),
                           "peak_memory": r.peak_memory, "peak_memory_kind": "process_peak_rss",
                           "batch_size": 16, "n_batches": 1, "choice": r.choice}
    assert r.choice.startswith("hutchinson: ~") and r.peak_memory > 0


def test_the_exact_ggn_has_a_zero_group_standard_error_and_splits_flat_vectors_by_module():
    """The exact GGN is one row, no spread: every group's standard error is zeros of its size;
    ``split`` cuts a flat per-channel vector at the modules' widths (a 3, b 4, c 3)."""
    r = estimate_hessian(tiny(), data(), opts(estimator="ggn", dtype="fp32"), names=NAMES)
    g0 = ChannelGroup(0, 2, (Member("a", "a", "out", 0, torch.tensor([[0], [2]])),))
    g1 = ChannelGroup(1, 3, (Member("c", "c", "out", 0, torch.arange(3)[:, None]),), "output")
    se = group_stderr([g0, g1], r)
    assert torch.equal(se[0], torch.zeros(2)) and torch.equal(se[1], torch.zeros(3))
    parts = r.split(torch.arange(10.0))
    assert {n: t.tolist() for n, t in parts.items()} == {"a": [0, 1, 2], "b": [3, 4, 5, 6], "c": [7, 8, 9]}


def test_options_validate_and_name_the_value():
    with pytest.raises(ValueError, match="estimator='newton'"):
        HessianOptions(estimator="newton")
    with pytest.raises(ValueError, match="min_probes=50 > max_probes=10"):
        HessianOptions(min_probes=50, max_probes=10)
    with pytest.raises(ValueError, match="tol=2"):
        HessianOptions(tol=2)
    with pytest.raises(ValueError, match="memory_budget=0 must be > 0"):
        HessianOptions(memory_budget=0)
    assert resolve_dtype("auto", torch.device("cpu")) in ("bf16", "fp32")
    assert resolve_dtype("fp32", torch.device("cuda")) == "fp32"
    with pytest.raises(HessianError, match="default cross-entropy"):
        estimate_hessian(tiny(), data(), opts(estimator="ggn"), loss_fn=F.mse_loss)


@pytest.mark.parametrize(("field", "edge", "beyond"), [
    *[(name, 1, 0) for name in ("batch_size", "n_batches", "min_probes", "check_every", "probe_batch",
                                "ggn_chunk", "exact_max_classes", "probes", "mc_samples", "mc_chunk")],
    ("max_probes", 20, 19),  # not below the default min_probes=20
    ("max_retries", 0, -1),
    ("loss_scale", 1e-30, 0.0),
    ("memory_budget", 1e-30, 0.0),
    *[(name, 1.0, 1.0001) for name in ("tol", "rank_threshold", "stderr_tol")],
    *[(name, 1e-30, 0.0) for name in ("tol", "rank_threshold", "stderr_tol")],
])
def test_options_accept_each_range_up_to_its_edge_and_refuse_past_it(field, edge, beyond):
    """Every count is >= 1 (``max_retries`` >= 0), ``loss_scale`` and ``memory_budget`` > 0, the
    three stop-rule thresholds in (0, 1]: the edge value itself is a valid option, the next one
    out is a ``ValueError`` naming the field and its value."""
    assert getattr(HessianOptions(**{field: edge}), field) == edge
    with pytest.raises(ValueError, match=f"{field}={beyond}"):
        HessianOptions(**{field: beyond})


def test_options_take_none_for_the_optional_counts_and_rules_and_check_the_pairs():
    """``None`` disables a stop rule or leaves a count to the rule/budget; ``min_probes`` may equal
    ``max_probes``; ``probe_batch > 1`` only with double backward; every name of each choice is valid."""
    none = HessianOptions(probes=None, mc_samples=None, mc_chunk=None, loss_scale=None, tol=None,
                          rank_threshold=None, stderr_tol=None)
    assert (none.probes, none.mc_samples, none.tol, none.stderr_tol) == (None, None, None, None)
    assert HessianOptions(min_probes=7, max_probes=7).max_probes == 7
    assert HessianOptions(probe_batch=4).probe_batch == 4  # double backward (the default)
    assert HessianOptions(hvp="forward_over_reverse", probe_batch=1).hvp == "forward_over_reverse"
    with pytest.raises(ValueError, match="probe_batch=2 needs hvp='double_backward'"):
        HessianOptions(hvp="forward_over_reverse", probe_batch=2)
    for field, names in (("estimator", ("auto", "ggn", "mc", "hutchinson", "hybrid")),
                         ("dtype", ("auto", "fp32", "bf16", "fp16")), ("amp", ("cast", "autocast")),
                         ("hvp", ("double_backward", "forward_over_reverse"))):
        for name in names:
            assert getattr(HessianOptions(**{field: name}), field) == name
        with pytest.raises(ValueError, match=f"{field}='int8'"):
            HessianOptions(**{field: "int8"})


def test_the_default_options_are_the_documented_ones_and_frozen():
    """The defaults docs/hessian.md and the docstring state: 256 samples in one Hessian batch, 20
    to 200 probes checked every 10, exact GGN up to 100 classes in chunks of 8, 2 MC draws, half
    the available memory, BN folded, contiguous layout, 30 fp16 retries, seeds 0, a progress bar.
    An options value is frozen: a pass cannot change what its caller (or another rank) passed."""
    import dataclasses

    o = HessianOptions()
    assert (o.estimator, o.dtype, o.amp, o.hvp) == ("auto", "auto", "cast", "double_backward")
    assert (o.batch_size, o.n_batches, o.probes, o.probe_batch) == (256, 1, None, 1)
    assert (o.min_probes, o.max_probes, o.check_every) == (20, 200, 10)
    assert (o.tol, o.rank_threshold, o.stderr_tol) == (0.02, 0.98, None)
    assert (o.ggn_chunk, o.exact_max_classes, o.mc_samples, o.mc_chunk) == (8, 100, 2, None)
    assert (o.memory_budget, o.fold_bn, o.channels_last, o.loss_scale, o.max_retries) == (0.5, True, False, None, 30)
    assert (o.seed, o.data_seed, o.progress) == (0, 0, True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.batch_size = 8


def test_user_model_is_untouched():
    net = tiny(nn.Tanh).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    estimate_hessian(net, data(), opts(estimator="hybrid", dtype="bf16", probes=2))
    assert net.training
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])


def test_group_scores_for_the_stop_rule_sum_each_groups_producer_channels():
    """The stop rule's group scores are ``index_add`` of the channel scores: channel ``i`` of a group
    collects every producer index of row ``i`` (a repeated index twice), groups laid end to end;
    producers that were not estimated are skipped, and no estimated producer at all is an error."""
    from ehap_fx.scoring.hessian import _group_index

    params = [torch.zeros(3, 2), torch.zeros(4, 2), torch.zeros(3, 2)]  # a: channels 0-2, b: 3-6, c: 7-9
    g0 = ChannelGroup(0, 2, (
        Member("a", "a", "out", 0, torch.tensor([[0], [2]])),
        Member("b", "b", "out", 0, torch.tensor([[1, 1], [2, 3]])),
        Member("b", "b", "in", 1, torch.tensor([[0], [2]])),  # a consumer: not a producer
        Member("z", "z", "out", 0, torch.tensor([[0], [1]])),  # not estimated: skipped
    ))
    g1 = ChannelGroup(1, 3, (Member("c", "c", "out", 0, torch.arange(3)[:, None]),))
    rows, cols, size = _group_index([g0, g1], NAMES, params, torch.device("cpu"))
    score = torch.zeros(size).index_add_(0, rows, torch.arange(10.0)[cols])
    assert size == 5 and score.tolist() == [0 + 4 + 4, 2 + 5 + 6, 7, 8, 9]
    with pytest.raises(HessianError, match="none of the groups has a producer among the estimated modules"):
        _group_index([ChannelGroup(2, 2, g0.members[3:])], NAMES, params, torch.device("cpu"))


def test_stop_rule_can_rank_groups():
    net = tiny(nn.ReLU)
    x, y = data()
    groups = [ChannelGroup(0, 3, (Member("a", "a", "out", 0, torch.arange(3)[:, None]),)),
              ChannelGroup(1, 4, (Member("b", "b", "out", 0, torch.arange(4)[:, None]),))]
    r = estimate_hessian(net, (x, y), opts(estimator="hutchinson", dtype="fp32", min_probes=10,
                                           max_probes=400, check_every=10, tol=None,
                                           rank_threshold=0.99), names=NAMES, groups=groups)
    assert r.converged and r.probes < 400 and r.history[-1][2] >= 0.99


@pytest.mark.slow
def test_pretrained_resnet20_ggn_bf16_ranks_like_fp32(cifar10_root, weights_dir):
    """Real data: half precision gives the same channel ranking (issue target: Spearman >= 0.95)."""
    import pickle

    from scipy.stats import spearmanr

    from ehap_fx.models import normalization, pretrained_model

    with open(cifar10_root / "cifar-10-batches-py" / "test_batch", "rb") as f:
        d = pickle.load(f, encoding="latin1")
    x = normalization("resnet20")(torch.from_numpy(d["data"][:512]).view(-1, 3, 32, 32))
    y = torch.tensor(d["labels"][:512])
    model = pretrained_model("resnet20", weights_dir)
    fp32, bf16 = (estimate_hessian(model, (x, y), opts(estimator="ggn", dtype=dt, batch_size=32))
                  for dt in ("fp32", "bf16"))
    a = torch.cat(list(fp32.sensitivity().values()))
    b = torch.cat(list(bf16.sensitivity().values()))
    assert spearmanr(a.numpy(), b.numpy()).statistic >= 0.95
    assert (a >= 0).all() and (a > 0).float().mean() > 0.9  # PSD; a few dead channels are 0


def test_spearman_is_one_minus_six_sum_d2_over_n_n2_minus_1():
    """Distinct ranks: ρ = 1 − 6 Σ d² / (n (n² − 1)); reversed is −1, the same order 1."""
    from ehap_fx.scoring.hessian import spearman

    a = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])
    assert spearman(a, a * 7 + 1) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    b = torch.tensor([0.1, 0.3, 0.2, 0.4, 0.5])  # one swapped pair: Σ d² = 2
    assert spearman(a, b) == pytest.approx(1 - 6 * 2 / (5 * 24))
    c = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0])  # ranks 4 0 3 1 2 against 0 1 2 3 4: Σ d² = 16+1+1+4+4
    assert spearman(a, c) == pytest.approx(1 - 6 * 26 / (5 * 24))


def test_each_stop_rule_holds_at_its_threshold_and_max_probes_always_stops():
    """``tol``: relative L1 change strictly below it; ``rank_threshold``: ρ at least it;
    ``stderr_tol``: Σ se / Σ |mean| at most it; every enabled rule must hold, and ``max_probes``
    stops whatever they say. The first check has no previous one: its change and ρ are NaN."""
    from ehap_fx.scoring.hessian import stop_check

    none = dict(tol=None, rank_threshold=None, stderr_tol=None, max_probes=50)
    mean, prev = torch.tensor([2.0, -2.0, 4.0]), torch.tensor([2.0, -1.0, 4.0])  # change 1/8
    se, score = torch.tensor([0.5, 0.25, 0.25]), torch.tensor([1.0, 2.0, 3.0])  # Σ se / Σ |mean| = 1/8
    prevs = (prev, score)

    def stops(n=10, prev=prevs, score=score, **kw):
        stop, row = stop_check(HessianOptions(**{**none, **kw}), n, mean, se, score, prev)
        return stop

    assert stops() and not stops(tol=0.125) and stops(tol=0.1251)
    _, row = stop_check(HessianOptions(**none), 10, mean, se, score, prevs)
    assert row == (10, 0.125, pytest.approx(1.0))
    rho = row[2]  # 1 up to rounding: the threshold itself is met, the next float above it not
    assert stops(rank_threshold=rho) and not stops(rank_threshold=math.nextafter(rho, 2))
    swapped = torch.tensor([1.0, 3.0, 2.0])  # ρ = 1 − 6·2/24 = 0.5 against the previous scores
    assert not stops(rank_threshold=0.51, score=swapped) and stops(rank_threshold=0.49, score=swapped)
    assert stops(stderr_tol=0.125) and not stops(stderr_tol=0.1249)
    assert not stops(tol=0.5, stderr_tol=0.1249) and not stops(tol=0.1, stderr_tol=0.5)
    assert stops(tol=0.5, rank_threshold=0.9, stderr_tol=0.5)
    assert not stops(prev=None, tol=0.5) and not stops(prev=None, rank_threshold=0.01)
    assert stops(prev=None, stderr_tol=0.5)
    _, first = stop_check(HessianOptions(**none), 3, mean, se, score, None)
    assert first[0] == 3 and math.isnan(first[1]) and math.isnan(first[2])
    assert stops(n=50, tol=1e-9) and not stops(n=49, tol=1e-9)


def test_the_stop_rule_checks_from_min_probes_every_check_every_and_at_max_probes():
    """``min_probes=4, check_every=3, max_probes=9``, asked after every probe: it checks at 4, 7
    and at 9 (the maximum, two probes after the last check), and stops only at 9 when no rule
    holds; a fixed ``probes`` count stops there without checking."""
    from ehap_fx.scoring.hessian import StopRule

    o = HessianOptions(min_probes=4, check_every=3, max_probes=9, tol=None, rank_threshold=None,
                       stderr_tol=1e-9, progress=False)
    rule = StopRule(o, lambda mean: mean)
    rows, stops = [], []
    for n in range(1, 10):
        rows.append(torch.tensor([[float(n), 1.0 + n % 2]]))
        stops.append(rule.done(n, rows))
    assert stops == [False] * 8 + [True]
    assert [h[0] for h in rule.history] == [4, 7, 9]
    fixed = StopRule(dataclasses.replace(o, probes=5), lambda mean: mean)
    assert [fixed.done(n, rows[:n]) for n in (4, 5, 6)] == [False, True, True] and fixed.history == []


def test_the_stop_rules_standard_error_is_the_rows_std_over_root_n():
    """At a check, ``se = std(rows) / √n``: rows (1, 3) and (3, 5) have std √2 per channel, so
    se/|mean| = (2·√2/√2)/(2 + 4) = 1/3, met by ``stderr_tol=1/3``, not by 0.33."""
    from ehap_fx.scoring.hessian import StopRule

    base = dict(min_probes=2, check_every=2, max_probes=10, tol=None, rank_threshold=None, progress=False)
    rows = [torch.tensor([[1.0, 3.0]]), torch.tensor([[3.0, 5.0]])]
    assert StopRule(HessianOptions(**base, stderr_tol=1 / 3 + 1e-6), lambda m: m).done(2, rows)
    assert not StopRule(HessianOptions(**base, stderr_tol=0.33), lambda m: m).done(2, rows)
    # one row has no spread: its standard error is 0 at a check too (as in the result), not NaN
    one = dict(base, min_probes=1, check_every=1)
    assert StopRule(HessianOptions(**one, stderr_tol=1e-9), lambda m: m).done(1, rows[:1])


def test_a_round_is_min_probes_first_then_check_every_never_past_max_probes():
    from ehap_fx.scoring.hessian import round_size

    o = HessianOptions(min_probes=20, check_every=10, max_probes=45)
    assert [round_size(None, o, n) for n in (0, 20, 30, 40)] == [20, 10, 10, 5]
    assert round_size(None, dataclasses.replace(o, min_probes=5), 0) == 10  # a round is at least check_every
    assert round_size(3, o, 40) == 3  # a fixed count is one round of it


def test_stderr_stop_rule():
    net = tiny(nn.Tanh)
    x, y = data()
    r = estimate_hessian(net, (x, y), opts(estimator="hutchinson", dtype="fp32", min_probes=10,
                                           max_probes=3000, check_every=10, tol=None,
                                           rank_threshold=None, stderr_tol=0.1), names=NAMES)
    se = sum(r.stderr[n].sum() for n in NAMES)
    total = sum(r.traces[n].abs().sum() for n in NAMES)
    assert r.converged and 10 < r.probes < 3000
    assert se / total <= 0.1 + 1e-6


@pytest.mark.parametrize("estimator", ["hutchinson", "ggn", "hybrid"])
def test_folding_batchnorm_changes_no_estimate(estimator):
    # folding BN into the conv before it is an exact reparametrisation: the estimates of the
    # original weights (probe for probe) and their norms must not move
    from ehap_fx.models import get_model
    from ehap_fx.scoring.fold import fold_batchnorm
    from tests.nets import randomize_bn

    torch.manual_seed(0)
    net = randomize_bn(get_model("resnet20"))
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    names = [n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    _, scales = fold_batchnorm(copy.deepcopy(net), names)
    assert len(scales) == len(names) - 1  # every conv is followed by a BN; the head is not
    opts = dict(estimator=estimator, dtype="fp32", batch_size=8, probes=3, progress=False)
    folded = estimate_hessian(net, (x, y), HessianOptions(**opts))
    plain = estimate_hessian(net, (x, y), HessianOptions(fold_bn=False, **opts))
    tol = 1e-3 * plain.probe_traces.abs().max()  # the hybrid subtracts two products: cancellation
    for n in names:
        torch.testing.assert_close(folded.traces[n], plain.traces[n], rtol=1e-3, atol=tol)
        torch.testing.assert_close(folded.weight_sq[n], plain.weight_sq[n], rtol=1e-5, atol=0)
    torch.testing.assert_close(folded.probe_traces, plain.probe_traces, rtol=1e-3, atol=tol)



def test_mc_rows_of_a_folded_conv_are_those_of_its_original_weights():
    """The MC estimator draws per-sample gradients of the folded weights ``s·w``: each row of
    conv ``a`` is multiplied back by ``s²`` (``‖∂ℓ/∂w‖² = s²‖∂ℓ/∂(s·w)‖²``), so folding the
    BN moves no row; the same seed draws the same labels from the same logits."""
    o = opts(estimator="mc", dtype="fp32", mc_samples=3)
    folded = estimate_hessian(tiny(), data(), o, names=NAMES)
    plain = estimate_hessian(tiny(), data(), dataclasses.replace(o, fold_bn=False), names=NAMES)
    assert folded.estimator == plain.estimator == "mc"
    torch.testing.assert_close(folded.probe_traces, plain.probe_traces, rtol=1e-4, atol=1e-7)

class _FoldCases(nn.Module):
    """One conv per case of ``fold_batchnorm``; only ``a`` and ``a2`` may fold::

        a -> bn_a                    folds (affine BN, conv with bias)
        a2 -> bn_a2                  folds (BN without affine, conv without bias)
        b -> bn_b, + b               no: the conv's output is read twice
        c -> c -> bn_c               no: the conv runs twice
        d -> bn_d -> bn_d            no: the BN runs twice
        e -> .relu()                 no: no BN module after it
        f -> bn_f                    no: the BN keeps no running statistics
        g -> bn_g                    no: g is not among the names
        lin -> bn_lin (BatchNorm1d)  no: a linear, not a conv
    """

    def __init__(self) -> None:
        super().__init__()
        for name in ("a", "b", "c", "d", "e", "f", "g"):
            self.add_module(name, nn.Conv2d(3, 3, 1))
            self.add_module(f"bn_{name}", nn.BatchNorm2d(3))
        self.a2, self.bn_a2 = nn.Conv2d(3, 3, 1, bias=False), nn.BatchNorm2d(3, affine=False)
        self.bn_f = nn.BatchNorm2d(3, track_running_stats=False)
        self.lin, self.bn_lin = nn.Linear(3, 3), nn.BatchNorm1d(3)

    def forward(self, x):
        x = self.bn_a2(self.a2(self.bn_a(self.a(x))))
        y = self.b(x)
        x = self.bn_b(y) + y
        x = self.bn_d(self.bn_d(self.d(self.bn_c(self.c(self.c(x))))))
        x = self.bn_g(self.g(self.bn_f(self.f(self.e(x).relu()))))
        return self.bn_lin(self.lin(x.mean((2, 3))))


def test_fold_batchnorm_folds_only_a_bn_that_alone_follows_a_conv_run_once():
    """Folding is ``s = γ/√(σ²+ε)`` (``1/√(σ²+ε)`` without affine): the conv's weight becomes
    ``s·w``, its bias ``(b − μ)·s + β``, and the BN no longer runs (a probe's saving). Every case
    where that would change the output or is not a conv+BN pair is left as it was."""
    from ehap_fx.scoring.fold import fold_batchnorm

    torch.manual_seed(0)
    net = _FoldCases().eval()
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            if m.affine:
                nn.init.uniform_(m.weight, 0.5, 2)
                nn.init.uniform_(m.bias, -1, 1)
    x = torch.randn(4, 3, 5, 5)
    names = ["a", "a2", "b", "c", "d", "e", "f", "lin"]
    folded, scales = fold_batchnorm(copy.deepcopy(net), names)
    assert sorted(scales) == ["a", "a2"]
    bn, bn2 = net.bn_a, net.bn_a2
    s = bn.weight.detach() / (bn.running_var + bn.eps).sqrt()
    s2 = 1 / (bn2.running_var + bn2.eps).sqrt()
    torch.testing.assert_close(scales["a"], s)
    torch.testing.assert_close(scales["a2"], s2)
    torch.testing.assert_close(folded.a.weight, net.a.weight.detach() * s[:, None, None, None])
    torch.testing.assert_close(folded.a.bias, (net.a.bias.detach() - bn.running_mean) * s + bn.bias.detach())
    torch.testing.assert_close(folded.a2.bias, -bn2.running_mean * s2)
    runs = [n.target for n in folded.graph.nodes if n.op == "call_module"]
    assert "bn_a" not in runs and "bn_a2" not in runs
    assert runs.count("bn_d") == 2 and {"bn_b", "bn_c", "bn_f", "bn_g", "bn_lin"} <= set(runs)
    for name in ("b", "c", "d", "e", "f", "g", "lin"):
        assert torch.equal(getattr(folded, name).weight, getattr(net, name).weight)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x))


def test_the_scoring_package_star_exports_its_public_api_only():
    """``from ehap_fx.scoring import *`` gives the five names of the door, not the submodules
    (``budget``, ``hessian``, …) that a bare star import of a package would also pull in."""
    names: dict = {}
    exec("from ehap_fx.scoring import *", names)
    assert set(names) - {"__builtins__"} == {"SCORERS", "HessianOptions", "Ranking", "magnitude_scores", "rank"}


def test_the_loss_sees_floating_outputs_in_fp32_and_the_rest_untouched():
    """A detector's or a Hugging Face model's output: only its floating tensors go to fp32, the
    integer ones and the non-tensors (a label, ``None``) pass as they are."""
    from ehap_fx.scoring.hessian import _fp32

    half, ids = torch.ones(2, dtype=torch.bfloat16), torch.arange(3)
    got = _fp32({"logits": half, "ids": ids, "extra": ("label", None)})
    assert got["logits"].dtype == torch.float32 and torch.equal(got["logits"], half.float())
    assert got["ids"] is ids and got["extra"] == ("label", None)


def test_one_probe_has_no_standard_error_rather_than_nan():
    """One Hutchinson probe: the trace is that probe's row, its standard error 0 (a sample of
    one has no spread to estimate; ``std`` of one row would be NaN and poison the stop rule)."""
    net = tiny()
    r = estimate_hessian(net, data(), opts(estimator="hutchinson", dtype="fp32", probes=1), names=NAMES)
    assert r.probes == 1 and r.probe_traces.shape[0] == 1
    torch.testing.assert_close(torch.cat([r.traces[n] for n in NAMES]), r.probe_traces[0])
    assert all((r.stderr[n] == 0).all() for n in NAMES)


def test_a_hutchinson_batch_that_needs_exactly_the_room_fits():
    from ehap_fx.errors import MemoryBudgetError
    from ehap_fx.scoring.plan import _probe_plan, _Room

    room, o = _Room(budget=200, room=100, how="given"), opts(estimator="hutchinson")
    assert _probe_plan(o, 100, room).estimator == "hutchinson"
    with pytest.raises(MemoryBudgetError, match=r"needs ~.* > .*\(given\)"):
        _probe_plan(o, 101, room)


def test_draw_batches_pools_what_a_stream_or_a_wrapper_yields():
    """A DataLoader over an IterableDataset (streamed data) yields batches whose samples are all
    there is: they are pooled (its dataset yields single samples and has ``Dataset``'s raising
    ``__getitem__``). A wrapper that is no DataLoader but carries one's ``.dataset`` (a shard of
    it, say) is drawn from what it yields, not from the whole dataset."""

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            for i in range(20):
                yield torch.full((2,), float(i)), i

    got = draw_batches(torch.utils.data.DataLoader(Stream(), batch_size=5), 4, 2, seed=0)
    assert [len(x) for x, _ in got] == [4, 4]
    seen = torch.cat([y for _, y in got])
    assert len(set(seen.tolist())) == 8 and torch.equal(torch.cat([x for x, _ in got])[:, 0], seen.float())

    x, y = torch.arange(100.0)[:, None], torch.arange(100)

    class Shard:  # yields the even samples; .dataset is the whole of them
        dataset = torch.utils.data.TensorDataset(x, y)

        def __iter__(self):
            return iter([(x[0::2], y[0::2])])

    drawn = draw_batches(Shard(), 10, 2, seed=0)
    assert all(int(v) % 2 == 0 for _, t in drawn for v in t)


@pytest.mark.parametrize("channels_last", [False, True])
def test_channels_last_puts_the_working_copy_and_its_batches_in_that_layout(channels_last):
    """``channels_last`` is a layout, not a result: the working copy's 4-D weights and the
    Hessian batches both take it (a model left contiguous would reorder every conv input)."""
    from ehap_fx.scoring.setup import prepare

    o = opts(estimator="hutchinson", dtype="fp32", channels_last=channels_last)
    s = prepare(tiny(), data(), o, NAMES, F.cross_entropy, torch.device("cpu"))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert s.model.a.weight.is_contiguous(memory_format=fmt)
    assert s.model.b.weight.is_contiguous(memory_format=fmt)
    assert all(x.is_contiguous(memory_format=fmt) for x, _ in s.batches)


@pytest.mark.parametrize("fold_bn", [True, False])
def test_prepare_folds_the_bn_after_a_conv_into_the_working_copy_unless_told_not_to(fold_bn):
    """``fold_bn`` (the default): the working copy's conv ``a`` holds ``s·w_a``, ``s = γ/√(σ²+ε)``
    of the BN after it, ``Setup.fold`` carries ``s`` for ``a`` (None for ``b`` and ``c``: no BN
    follows them) and the BN no longer runs; ``fold_bn=False`` keeps the weights and the BN.
    Either way the working copy computes the model's logits."""
    from ehap_fx.scoring.setup import prepare

    net = tiny()
    s = prepare(net, data(), opts(estimator="hutchinson", dtype="fp32", fold_bn=fold_bn), NAMES,
                F.cross_entropy, torch.device("cpu"))
    bn = net.bn
    scale = bn.weight.detach() / (bn.running_var + bn.eps).sqrt()
    if fold_bn:
        torch.testing.assert_close(s.fold[0], scale)
        assert s.fold[1:] == [None, None]
        torch.testing.assert_close(s.params[0].detach(), net.a.weight.detach() * scale[:, None, None, None])
        assert "bn" not in [n.target for n in s.model.graph.nodes if n.op == "call_module"]
    else:
        assert s.fold == [None, None, None]
        assert torch.equal(s.params[0].detach(), net.a.weight.detach())
    x = s.batches[0][0]
    torch.testing.assert_close(s.model(x), net(x))


def test_the_cpu_peak_memory_is_the_process_peak_resident_size_in_bytes():
    """On a CPU the peak is the process's high-water resident size in bytes (``ru_maxrss`` is in
    kB: ``VmHWM`` of ``/proc/self/status`` agrees); after touching 64 MiB it is at least that."""
    import os
    import re

    from ehap_fx.scoring.setup import peak_memory

    if not os.path.exists("/proc/self/status"):
        pytest.skip("no /proc (not Linux): nothing to compare the peak with")

    def hwm() -> int:
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024

    big = torch.ones(2**24)  # 64 MiB, written: resident
    peak, kind = peak_memory(torch.device("cpu"))
    assert kind == "process_peak_rss" and peak >= big.numel() * 4
    assert abs(peak - hwm()) <= 0.01 * peak  # the kernel's two counts differ by a few hundred kB


def test_a_cuda_estimate_counts_its_peak_from_its_own_start(monkeypatch):
    """``start_device`` on CUDA resets that device's peak counter, so the reported peak is the
    estimate's, not an earlier allocation's (recorded here: no GPU needed)."""
    from ehap_fx.scoring.setup import start_device

    reset = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: reset.append(device))
    assert start_device(tiny(), "cuda:1") == torch.device("cuda:1") and reset == [torch.device("cuda:1")]
    assert start_device(tiny(), None) == torch.device("cpu") and len(reset) == 1  # the model's device


@pytest.mark.parametrize(("amp", "dtype", "weights", "inputs", "out"), [
    ("cast", "bf16", torch.bfloat16, torch.bfloat16, torch.bfloat16),  # a half copy, no autocast
    ("autocast", "bf16", torch.float32, torch.float32, torch.bfloat16),  # fp32 weights, bf16 compute
    ("autocast", "fp32", torch.float32, torch.float32, torch.float32),  # nothing to autocast to
    ("cast", "fp32", torch.float32, torch.float32, torch.float32),
])
def test_amp_cast_runs_a_half_copy_and_autocast_keeps_fp32_weights_and_inputs(amp, dtype, weights, inputs, out):
    """``amp="cast"``: the working copy and the Hessian batches in the compute dtype;
    ``amp="autocast"``: both stay fp32 and the forward runs under autocast to that dtype."""
    from ehap_fx.scoring.setup import prepare

    o = opts(estimator="hutchinson", dtype=dtype, amp=amp)
    s = prepare(tiny(), data(), o, NAMES, F.cross_entropy, torch.device("cpu"))
    assert s.dtype == {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    assert s.model.a.weight.dtype == s.model.c.weight.dtype == weights
    assert all(x.dtype == inputs for x, _ in s.batches) and all(y.dtype == torch.int64 for _, y in s.batches)
    with s.autocast():
        assert s.model(s.batches[0][0]).dtype == out


@pytest.mark.parametrize("amp", ["cast", "autocast"])
def test_a_half_copy_runs_without_autocast_so_ops_autocast_lifts_to_fp32_stay_half(amp):
    """Autocast runs some ops in fp32 whatever their inputs (``mse_loss``, ``prod`` on a CPU); a bf16 *copy* (``amp="cast"``) must run as cast, with no autocast re-lifting those ops,
    while ``amp="autocast"`` does lift them."""
    from ehap_fx.scoring.setup import prepare

    o = opts(estimator="hutchinson", dtype="bf16", amp=amp)
    s = prepare(tiny(), data(), o, NAMES, F.cross_entropy, torch.device("cpu"))
    h = torch.randn(4, 3, dtype=torch.bfloat16)
    with s.autocast():
        lifted = (F.mse_loss(h, 2 * h).dtype, torch.prod(h).dtype)
    assert lifted == ((torch.bfloat16,) * 2 if amp == "cast" else (torch.float32,) * 2)


def test_the_ggn_of_a_linear_softmax_layer_in_closed_form():
    """logits = W x + b: row c of W has ``Tr(G_c) = mean_n ‖x_n‖² p_nc (1 − p_nc)`` and
    ``(G v)_c = mean_n [(diag p_n − p_n p_nᵀ) v x_n]_c x_n``, with no autocast given."""
    from ehap_fx.scoring.ggn import ggn_channel_traces, ggn_vector_product

    torch.manual_seed(0)
    net, x, v = nn.Linear(5, 3), torch.randn(6, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    net = net.double()
    p = net(x).softmax(-1).detach()  # (N, 3)
    (traces,) = ggn_channel_traces(net, ["weight"], x, chunk=4)  # two chunks: 4 + 2 samples
    torch.testing.assert_close(traces, (x.pow(2).sum(1, keepdim=True) * p * (1 - p)).mean(0).float())
    jv = x @ v.T  # (N, 3)
    u = p * jv - p * (p * jv).sum(1, keepdim=True)
    (gv,) = ggn_vector_product(net, ["weight"], x, [v])
    torch.testing.assert_close(gv, u.T @ x / len(x))


def test_the_default_stop_rule_checks_from_20_probes_and_stops_at_200():
    """``min_probes=20``, ``max_probes=200``: a rule met at once stops at the first check, after
    20 draws; one never met stops at 200, not converged (the MC estimator: a draw is cheap)."""
    x, y = data()
    base = dict(estimator="mc", dtype="fp32", mc_samples=None, tol=None, rank_threshold=None)
    met = estimate_hessian(tiny(), (x, y), opts(**base, stderr_tol=1.0), names=NAMES)
    assert met.probes == 20 and met.converged and [h[0] for h in met.history] == [20]
    never = estimate_hessian(tiny(), (x, y), opts(**base, stderr_tol=1e-9), names=NAMES)
    assert never.probes == 200 and not never.converged
    assert [h[0] for h in never.history] == list(range(20, 201, 10))


@pytest.mark.parametrize("estimator", ["hutchinson", "mc"])
def test_a_fixed_count_past_max_probes_is_converged(estimator):
    """``max_probes`` caps the adaptive rule only: a fixed count (``probes``, or ``mc_samples``
    for MC) is what was asked for, so 3 of them with ``max_probes=2`` are a converged estimate."""
    fixed = opts(estimator=estimator, dtype="fp32", probes=3, mc_samples=3, min_probes=1, max_probes=2)
    r = estimate_hessian(tiny(), data(), fixed, names=NAMES)
    assert (r.probes, r.converged) == (3, True)



def test_auto_keeps_the_exact_ggn_while_one_sample_fits_and_falls_back_to_mc_below():
    """``"auto"`` lowers the exact GGN's chunk down to one sample before it gives up on it: a
    budget of exactly one sample's exact footprint plans ``ggn_chunk=1``; one byte less falls
    back to MC (whose footprint is far smaller), saying why."""
    from ehap_fx.scoring.hessian import choose_estimator

    x, y = data()
    one = choose_estimator(tiny(), (x, y), opts(estimator="ggn", dtype="fp32", ggn_chunk=1), names=NAMES)
    fits = choose_estimator(tiny(), (x, y), opts(dtype="fp32", ggn_chunk=4, memory_budget=one.footprint),
                            names=NAMES)
    assert (fits.estimator, fits.ggn_chunk, fits.footprint) == ("ggn", 1, one.footprint)
    less = choose_estimator(tiny(), (x, y), opts(dtype="fp32", ggn_chunk=4, memory_budget=one.footprint - 1),
                            names=NAMES)
    assert less.estimator == "mc" and "the exact GGN needs" in less.reason

def test_the_exact_ggn_plan_is_the_largest_chunk_its_footprint_fits():
    """The plan's footprint is ``ggn_chunk`` samples' worth (the reason prints it): a budget of
    exactly that many bytes keeps the chunk, one byte less takes one sample off it."""
    from ehap_fx.scoring.budget import fmt_bytes
    from ehap_fx.scoring.hessian import choose_estimator

    x, y = data()
    plan = choose_estimator(tiny(), (x, y), opts(estimator="ggn", ggn_chunk=4), names=NAMES)
    assert plan.estimator == "ggn" and plan.ggn_chunk == 4 and f"~{fmt_bytes(plan.footprint)}" in plan.reason
    per_sample = plan.footprint // 4
    assert plan.footprint == 4 * per_sample
    same = choose_estimator(tiny(), (x, y), opts(estimator="ggn", ggn_chunk=4, memory_budget=plan.footprint),
                            names=NAMES)
    assert (same.ggn_chunk, same.footprint) == (4, plan.footprint)
    less = choose_estimator(tiny(), (x, y), opts(estimator="ggn", ggn_chunk=4, memory_budget=plan.footprint - 1),
                            names=NAMES)
    assert (less.ggn_chunk, less.footprint) == (3, 3 * per_sample)
    assert "lowered" not in plan.reason + same.reason and "ggn_chunk=3, ggn_chunk lowered from 4" in less.reason
    hybrid = choose_estimator(tiny(), (x, y), opts(estimator="hybrid", ggn_chunk=4), names=NAMES)
    assert (hybrid.estimator, hybrid.ggn_chunk) == ("hybrid", 4)
    assert plan.reason.startswith("exact GGN: 3 classes") and hybrid.reason.startswith("hybrid (exact GGN part): 3 classes")
    # bytes reserved for the caller (``extra``: the removal matrices) come off the budget first
    kept = choose_estimator(tiny(), (x, y), opts(estimator="ggn", ggn_chunk=4, memory_budget=plan.footprint + 1),
                            names=NAMES, extra=2)
    assert (kept.ggn_chunk, kept.footprint) == (3, 3 * per_sample)


def test_forward_over_reverse_averages_over_two_batches_as_double_backward_does():
    """Two Hessian batches of 8: both HVP modes give the mean of the two batches' products,
    probe for probe (each batch alone was checked above)."""
    net = tiny(nn.Tanh)
    x, y = data()
    two = dict(estimator="hutchinson", dtype="fp32", probes=6, batch_size=8, n_batches=2)
    base = estimate_hessian(net, (x, y), opts(**two), names=NAMES)
    fwd = estimate_hessian(net, (x, y), opts(**two, hvp="forward_over_reverse"), names=NAMES)
    assert base.n_batches == fwd.n_batches == 2
    torch.testing.assert_close(fwd.probe_traces, base.probe_traces, rtol=1e-4, atol=1e-6)



@pytest.mark.parametrize("bf16", [True, False])
def test_auto_dtype_is_bf16_on_a_cpu_that_has_it(bf16, monkeypatch):
    """``dtype="auto"``: fp16 on CUDA, bf16 on a CPU with native bf16, fp32 otherwise."""
    import types

    from ehap_fx.scoring import setup

    monkeypatch.setattr(setup, "cpu_features", lambda: types.SimpleNamespace(bf16=bf16))
    assert resolve_dtype("auto", torch.device("cpu")) == ("bf16" if bf16 else "fp32")
    assert resolve_dtype("auto", torch.device("cuda")) == "fp16"


@pytest.mark.parametrize("bad", ["zz", "act1"], ids=["not-a-module", "no-weight"])
def test_names_that_are_not_weighted_modules_are_refused_naming_them(bad):
    """A name the model has no module of, or a module without a weight (a ReLU), is refused
    before any probe, with every such name in the message."""
    import re

    x, y = data()
    with pytest.raises(HessianError, match=re.escape(f"modules ['{bad}'] have no weight")):
        estimate_hessian(tiny(), (x, y), opts(estimator="ggn", dtype="fp32"), names=["a", bad])
