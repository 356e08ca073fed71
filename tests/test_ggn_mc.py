"""The Monte-Carlo GGN (``ehap_fx.scoring.ggn_mc``) and the memory budget guard (``ehap_fx.scoring.budget``).

Model under test: ``test_hessian.tiny`` (ReLU, 174 weights: the full Hessian is cheap)::

    x (N,2,4,4) -> conv a -> BN -> ReLU -> conv b -> ReLU -> avgpool -> linear c -> (N,3)

Per-sample reductions are checked layer by layer against ``torch.func`` per-sample gradients;
the estimates against ``torch.func.hessian`` within their own standard errors.
"""

import dataclasses

import pytest
import torch
from test_hessian import NAMES, data, exact_traces, tiny
from test_removal import grouped, tiny_relu
from torch import nn
from torch.func import functional_call, grad, vmap

from ehap_fx.errors import MemoryBudgetError
from ehap_fx.scoring.ggn_mc import channel_sq_norms, im2col_sq_norms, input_directional, label_noise, share
from ehap_fx.scoring.hessian import estimate_hessian
from ehap_fx.scoring.options import HessianOptions
from ehap_fx.scoring.removal import estimate_removal

pytestmark = pytest.mark.usefixtures("one_thread")

MC = HessianOptions(estimator="mc", dtype="fp32", batch_size=16, progress=False)

# (module, input shape): the Gram path is taken where T²(K + C) < C·T·K, i.e. small outputs
LAYERS = {
    "conv3x3": (nn.Conv2d(4, 6, 3, padding=1), (3, 4, 7, 7)),  # T=49, K=36, C=6: direct
    "strided-dilated-grouped": (nn.Conv2d(4, 6, 3, stride=2, dilation=2, padding=2, groups=2), (3, 4, 7, 7)),
    "depthwise-same-reflect": (nn.Conv2d(4, 4, 3, groups=4, padding="same", padding_mode="reflect"), (3, 4, 6, 6)),
    # depthwise convs take their own path (the per-sample gradient as an m·C-group conv)
    "depthwise-strided-dilated": (nn.Conv2d(4, 4, 3, stride=2, dilation=2, padding=1, groups=4), (3, 4, 8, 9)),
    "depthwise-multiplier-5x5": (nn.Conv2d(3, 6, 5, stride=2, padding=2, groups=3), (3, 3, 9, 9)),
    "depthwise-even-same": (nn.Conv2d(4, 4, (2, 3), padding="same", groups=4), (3, 4, 6, 7)),
    "depthwise-tall": (nn.Conv2d(4, 4, (3, 2), stride=(2, 1), groups=4), (3, 4, 8, 5)),  # kh > kw, kh rows kept
    "depthwise-conv1d": (nn.Conv1d(4, 8, 3, stride=2, padding=1, groups=4), (3, 4, 10)),
    "pointwise-strided": (nn.Conv2d(4, 6, 1, stride=2), (3, 4, 7, 7)),
    "even-kernel-same": (nn.Conv2d(4, 8, 4, padding="same"), (3, 4, 6, 6)),
    "gram": (nn.Conv2d(16, 32, 3), (3, 16, 6, 6)),  # T=16, K=144, C=32: Gram
    "conv1d": (nn.Conv1d(4, 6, 3, padding=2, dilation=2), (3, 4, 9)),
    "linear": (nn.Linear(5, 3), (3, 5)),  # T=1: Gram, ‖b‖²·‖a‖²
    "linear-seq": (nn.Linear(5, 3), (3, 7, 5)),  # T=7 tokens, C=3 < T: direct
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_per_sample_reductions_equal_torch_func_per_sample_gradients(name):
    torch.manual_seed(0)
    module, shape = LAYERS[name]
    x = torch.randn(*shape)
    b = torch.randn_like(module(x))

    def f(w, x1, b1):
        return (functional_call(module, {"weight": w, "bias": module.bias}, (x1[None],)) * b1[None]).sum()

    w = module.weight.detach()
    g = vmap(grad(f), in_dims=(None, 0, 0))(w, x, b)  # (N, *w.shape): per-sample gradients

    def close(got, ref):
        # the same fp32 sums in another order: a few ulps of the largest value (measured <= 3)
        atol = 16 * torch.finfo(torch.float32).eps * float(ref.abs().max())
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=atol)

    close(channel_sq_norms(module, x, b), g.pow(2).flatten(2).sum(-1))
    close(im2col_sq_norms(module, x, b), g.pow(2).flatten(2).sum(-1))  # the general path, depthwise too
    close(input_directional(module, x, b), (g * w).transpose(1, 2).flatten(2).sum(-1))  # ⟨W[:, i], g[:, i]⟩


def _flat(d):
    return torch.cat([d[n] for n in NAMES])


@pytest.mark.parametrize(("dtype", "rel"), [("fp32", 0.0), ("bf16", 0.02), ("fp16", 0.005)])
def test_mc_estimate_is_within_its_standard_error_of_the_exact_trace(dtype, rel):
    # ReLU net: Tr(G_c) = Tr(H_c). 400 draws x 16 inputs: SE ~1-2 % of each trace; 10 channels
    # at 4 SE fail by chance with probability ~6e-4; a biased estimator (the empirical Fisher,
    # true labels) is off by far more than that. Half precision adds its rounding (rel).
    net = tiny(nn.ReLU)
    x, y = data()
    exact = _flat(exact_traces(net, x, y)).detach()
    r = estimate_hessian(net, (x, y), dataclasses.replace(MC, dtype=dtype, mc_samples=400, seed=3),
                         names=NAMES)
    est, se = _flat(r.traces), _flat(r.stderr)
    assert r.estimator == "mc" and r.probes == 400 and r.probe_traces.shape == (400, 10)
    assert ((est - exact).abs() <= 4 * se + rel * exact).all(), ((est - exact) / se)
    assert (se < 0.05 * exact).all()  # precise enough for the bound to mean something
    if dtype == "fp16":
        assert r.loss_scale == 2.0**12  # 2¹⁶ / batch 16: the gradients of the mean-loss rule


def test_mc_with_true_labels_would_fail_the_bound():
    """The bound above can fail: the empirical Fisher (observed labels) is not Tr(G_c)."""
    net = tiny(nn.ReLU)
    x, y = data()
    exact = _flat(exact_traces(net, x, y)).detach()
    logits = net(x)
    g = torch.autograd.grad(nn.functional.cross_entropy(logits, y, reduction="sum"), logits)[0]
    assert g.shape == (16, 3)
    # per-sample Fisher of the last layer c: ‖(p − e_y) ⊗ h‖², against its exact trace
    h = net[:-1](x)
    fisher = (g.pow(2).T @ h.pow(2).sum(1)) / 16
    assert ((fisher - exact[-3:]).abs() / exact[-3:]).max() > 0.2


def test_micro_batches_and_parts_give_the_same_rows():
    net = tiny(nn.ReLU)
    x, y = data()
    opts = dataclasses.replace(MC, mc_samples=3)
    whole = estimate_hessian(net, (x, y), opts, names=NAMES).probe_traces
    chunked = estimate_hessian(net, (x, y), dataclasses.replace(opts, mc_chunk=5), names=NAMES).probe_traces
    parts = sum(estimate_hessian(net, (x, y), opts, names=NAMES, part=(r, 3)).probe_traces for r in range(3))
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-7)
    assert [share(16, (r, 3)) for r in range(3)] == [(0, 6), (6, 11), (11, 16)]
    assert torch.equal(label_noise(0, 2, [16])[0][:, 6:11], label_noise(0, 2, [16])[0][:, 6:11])


def test_an_mc_pass_forwards_the_whole_batch_unless_chunked_and_a_part_only_its_share():
    """``chunk=None``: one forward of the whole batch serves every draw; ``chunk=5``: 16 samples
    go 5, 5, 5, 1; ``part=(1, 3)`` forwards only samples [6, 11) of 16."""
    from ehap_fx.scoring.ggn_mc import mc_channel_traces

    net = tiny(nn.ReLU).eval()
    x, _ = data()
    seen = []
    net.a.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    for chunk, part, want in ((None, None, [16]), (5, None, [5, 5, 5, 1]), (None, (1, 3), [5])):
        seen.clear()
        mc_channel_traces(net, NAMES, [x], 3, 0, chunk=chunk, part=part)
        assert seen == want, (chunk, part)


def test_mc_traces_of_integer_inputs_flow_to_the_weights():
    """Token ids cannot carry a gradient: the backward passes then target the weights, and a
    model whose weights are all frozen is a ``HessianError`` saying so."""
    from ehap_fx.errors import HessianError
    from ehap_fx.scoring.ggn_mc import mc_channel_traces

    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 5))
    ids = torch.randint(0, 10, (6, 3))
    rows = mc_channel_traces(net, ["2"], [ids], 2, 0)
    assert rows.shape == (2, 5) and (rows > 0).all()
    with pytest.raises(HessianError, match="integer inputs: the MC estimator needs the estimated weights"):
        mc_channel_traces(net.requires_grad_(False), ["2"], [ids], 2, 0)


def test_stop_rule_counts_draws():
    net = tiny(nn.ReLU)
    opts = dataclasses.replace(MC, mc_samples=None, min_probes=4, check_every=4, max_probes=64,
                               tol=None, rank_threshold=None, stderr_tol=0.05)
    r = estimate_hessian(net, data(), opts, names=NAMES)
    n = [h[0] for h in r.history]
    assert n == list(range(4, r.probes + 1, 4)) and r.converged and r.probes < 64
    se, mean = _flat(r.stderr), _flat(r.traces)
    assert se.sum() / mean.abs().sum() <= 0.05  # the rule it stopped on


def test_forced_overflow_is_redone_at_lower_scale():
    net = tiny(nn.ReLU)
    x, y = data()
    plain = estimate_hessian(net, (x, y), dataclasses.replace(MC, mc_samples=2), names=NAMES)
    # 2⁸⁰ / batch 16 = 2⁷⁶ on the cotangents: their squares pass fp32's 2¹²⁸ until ~2⁶⁴
    scaled = estimate_hessian(net, (x, y), dataclasses.replace(MC, mc_samples=2, loss_scale=2.0**80),
                              names=NAMES)
    assert scaled.retries >= 10 and scaled.loss_scale <= 2.0**64
    torch.testing.assert_close(scaled.probe_traces, plain.probe_traces, rtol=1e-5, atol=1e-8)


def test_mc_removal_is_unbiased_for_the_exact_criterion():
    torch.manual_seed(0)
    x, y = torch.randn(16, 2, 5, 5), torch.randint(0, 3, (16,))
    gm, groups = grouped(tiny_relu(), x)
    exact = estimate_removal(gm, (x, y), groups, dataclasses.replace(MC, estimator="ggn"))
    runs = [estimate_removal(gm, (x, y), groups, dataclasses.replace(MC, mc_samples=50, seed=s))
            for s in range(8)]
    assert exact.method == "exact" and runs[0].method == "mc"
    for g in groups:
        q = torch.stack([r.joint[g.id] for r in runs])  # (8, size, size): 8 independent runs
        mean, se = q.mean(0), q.std(0) / 8**0.5
        assert ((mean - exact.joint[g.id]).abs() <= 4 * se + 1e-9).all()
        assert (se.diagonal() < 0.1 * exact.scores[g.id]).all()



def test_mc_removal_over_two_batches_is_unbiased_for_their_mean():
    """Two batches of 8: the exact ``Q`` is their mean, and so is MC's (the draws' mean per batch,
    then over the batches), within 4 standard errors of 8 independent runs."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 2, 5, 5), torch.randint(0, 3, (16,))
    gm, groups = grouped(tiny_relu(), x)
    two = [(x[:8], y[:8]), (x[8:], y[8:])]
    opts = dataclasses.replace(MC, batch_size=8, n_batches=2)
    exact = estimate_removal(gm, two, groups, dataclasses.replace(opts, estimator="ggn"))
    runs = [estimate_removal(gm, two, groups, dataclasses.replace(opts, mc_samples=50, seed=s))
            for s in range(8)]
    assert exact.n_batches == runs[0].n_batches == 2 and runs[0].method == "mc"
    for g in groups:
        q = torch.stack([r.joint[g.id] for r in runs])  # (8, size, size)
        mean, se = q.mean(0), q.std(0) / 8**0.5
        assert ((mean - exact.joint[g.id]).abs() <= 4 * se + 1e-9).all()

def _wide_head(classes: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, classes))


def _images(classes: int, n=8):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, classes, (n,), generator=g)


def test_auto_takes_the_exact_ggn_for_few_classes_and_mc_for_many():
    few = estimate_hessian(_wide_head(10), _images(10), HessianOptions(batch_size=8, progress=False))
    many = estimate_hessian(_wide_head(1000), _images(1000), HessianOptions(batch_size=8, progress=False))
    assert few.estimator == "ggn" and few.choice.startswith("exact GGN: 10 classes")
    assert many.estimator == "mc" and "1000 classes > exact_max_classes=100" in many.choice
    assert many.summary()["choice"] == many.choice  # and so in compress()'s report


@pytest.mark.parametrize(("classes", "estimator"), [(100, "ggn"), (101, "mc")])
def test_auto_takes_the_exact_ggn_up_to_exactly_exact_max_classes(classes, estimator):
    """The default ``exact_max_classes=100`` is inclusive: 100 classes is still the exact GGN,
    101 the MC estimator (the plan alone: one one-sample forward)."""
    from ehap_fx.scoring.hessian import choose_estimator

    plan = choose_estimator(_wide_head(classes), _images(classes), HessianOptions(batch_size=8, progress=False))
    assert plan.estimator == estimator
    assert ("101 classes > exact_max_classes=100" in plan.reason) == (classes == 101)


class _Dense(nn.Module):
    """A segmentation-like head: per-pixel logits (N, 5, 8, 8), or those in a tuple."""

    def __init__(self, wrap: bool) -> None:
        super().__init__()
        self.conv, self.wrap = nn.Conv2d(3, 5, 1), wrap

    def forward(self, x):
        return (self.conv(x),) if self.wrap else self.conv(x)


@pytest.mark.parametrize("estimator", ["auto", "ggn", "mc", "hybrid"])
@pytest.mark.parametrize("wrap", [False, True], ids=["4d", "tuple"])
def test_estimators_of_the_softmax_ggn_refuse_outputs_that_are_not_logits_before_running(estimator, wrap):
    """Every estimator but Hutchinson is the GGN of a softmax over classes: a model whose one-sample
    output is not a ``(1, classes)`` tensor is refused at the plan, naming the shape, with the way out;
    Hutchinson plans for it (any loss, any output)."""
    from ehap_fx.errors import HessianError
    from ehap_fx.scoring.hessian import choose_estimator

    torch.manual_seed(0)
    net, x = _Dense(wrap), torch.randn(4, 3, 8, 8)
    o = HessianOptions(estimator=estimator, batch_size=4, progress=False)
    shown = "tuple" if wrap else r"torch.Size\(\[1, 5, 8, 8\]\)"
    with pytest.raises(HessianError, match=rf"needs \(N, classes\) logits; the model returns {shown} .*'hutchinson'"):
        choose_estimator(net, (x, torch.zeros(4)), o)
    assert choose_estimator(net, (x, torch.zeros(4)), dataclasses.replace(o, estimator="hutchinson")).estimator == "hutchinson"


def test_budget_guard_takes_the_cheaper_path_instead_of_exhausting_memory():
    # 200 classes: the exact pass holds 200 per-sample gradients and backward passes per
    # sample (~3 MiB predicted here), the MC pass one draw's (~23 KiB). A 300 KiB budget fits
    # only the MC one, 40 KiB only one sample of it at a time.
    model, data200 = _wide_head(200), _images(200)
    opts = HessianOptions(batch_size=8, progress=False, exact_max_classes=1000, memory_budget=300 * 2**10)
    r = estimate_hessian(model, data200, opts)
    assert r.estimator == "mc" and "the exact GGN needs" in r.choice
    roomy = estimate_hessian(model, data200, dataclasses.replace(opts, memory_budget=2**30))
    assert roomy.estimator == "ggn"
    with pytest.raises(MemoryBudgetError, match=r"estimator='ggn' with 200 classes needs .* use "
                                                r"estimator='auto' or 'mc', or raise memory_budget"):
        estimate_hessian(model, data200, dataclasses.replace(opts, estimator="ggn"))
    chunk = dataclasses.replace(opts, memory_budget=40 * 2**10)  # room for about 2 samples
    small = estimate_hessian(model, data200, chunk)
    assert small.estimator == "mc" and "samples per pass" in small.choice
    assert int(small.choice.split(" samples per pass")[0].split()[-1]) < 8


def test_too_small_a_budget_is_a_one_line_error_naming_the_fix():
    with pytest.raises(MemoryBudgetError, match=r"MC estimator needs .* for one sample > .*: "
                                                r"raise memory_budget") as e:
        estimate_hessian(_wide_head(1000), _images(1000),
                         HessianOptions(batch_size=8, progress=False, memory_budget=1000))
    assert "\n" not in str(e.value)
    with pytest.raises(MemoryBudgetError, match="lower batch_size"):
        estimate_hessian(_wide_head(10), _images(10), HessianOptions(
            estimator="hutchinson", batch_size=8, probes=1, progress=False, memory_budget=1000))
    with pytest.raises(ValueError, match="memory_budget=0"):
        HessianOptions(memory_budget=0)


class _DeadBranch(nn.Module):
    """conv ``dead`` runs, but nothing reads its output: its trace is 0, not an error."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.dead, self.head = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 2, 3), nn.Linear(4, 5)

    def forward(self, x):
        self.dead(x)
        return self.head(self.conv(x).relu().mean((2, 3)))


def test_a_layer_the_loss_ignores_scores_zero():
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 5, (8,))
    r = estimate_hessian(_DeadBranch(), (x, y), dataclasses.replace(MC, batch_size=8))
    assert torch.equal(r.traces["dead"], torch.zeros(2)) and (r.traces["conv"] > 0).all()


def test_mc_removal_of_a_layer_the_loss_ignores_is_zero():
    """``dead``'s output reaches no loss: its removal matrix ``Q`` is exactly zero, not a missing
    derivative; ``conv``, read by the head, has a positive diagonal (its channels matter)."""
    from ehap_fx.scoring.ggn_mc import mc_removal

    torch.manual_seed(0)
    idx = torch.arange(3)[:, None]  # the 3 input channels of each conv
    q = mc_removal(_DeadBranch(), {"dead": [(0, idx)], "conv": [(1, idx)]}, {0: 3, 1: 3},
                   [torch.randn(4, 3, 6, 6)], 2, 0)
    assert torch.equal(q[0], torch.zeros(3, 3)) and (q[1].diagonal() > 0).all()


@pytest.mark.parametrize(("name", "kind"), [("1", "BatchNorm2d"), ("nowhere", "missing")])
def test_mc_refuses_a_module_it_cannot_reduce_naming_its_kind(name, kind):
    """Only Conv1d, Conv2d and Linear have per-sample reductions: a BatchNorm (or a name that is
    no module) is refused with its kind, pointing to the exact GGN."""
    from ehap_fx.errors import HessianError
    from ehap_fx.scoring.ggn_mc import mc_channel_traces

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 2))
    with pytest.raises(HessianError, match=rf"module '{name}' \({kind}\).*estimator='ggn'"):
        mc_channel_traces(net.eval(), [name], [torch.randn(2, 3, 4, 4)], 1, 0)


@pytest.mark.parametrize(("part", "samples"), [(None, 16), ((0, 2), 8), ((1, 2), 8), ((2, 3), 5)])
def test_an_mc_part_sizes_its_passes_by_its_own_share_of_the_batch(part, samples):
    """With ``part=(rank, world)`` a rank forwards only its share of the 16 samples (8 of 2 ranks;
    rank 2 of 3 the last 5: 6 + 5 + 5), so one pass holds that share, not the batch or more."""
    r = estimate_hessian(tiny(), data(), MC, names=NAMES, part=part)
    assert f"; {samples} samples per pass" in r.choice


def test_compress_with_too_small_a_budget_stops_with_the_fix_before_estimating():
    """The bad-input case through the public call: one line naming the option to change."""
    from ehap_fx.compress import compress

    model, (x, y) = _wide_head(1000), _images(1000)
    with pytest.raises(MemoryBudgetError, match="raise memory_budget") as e:
        compress(model, x[:1], data=[(x, y)], hessian=HessianOptions(batch_size=8, progress=False, memory_budget=1000))
    assert "\n" not in str(e.value)


def test_label_draws_are_seeded_seed_plus_round_times_the_stride():
    """``mc_samples`` draws are one round seeded ``seed``; the stop rule's rounds are seeded
    ``seed + round · SEED_STRIDE`` (what torchrun's ranks reproduce): the estimate's rows are
    ``mc_channel_traces`` at those seeds on the drawn batch (no BatchNorm folded: the rows are
    not rescaled)."""
    from ehap_fx.scoring.ggn_mc import mc_channel_traces
    from ehap_fx.scoring.options import SEED_STRIDE
    from ehap_fx.scoring.sampling import draw_batches

    net = tiny(nn.ReLU)
    x, y = data()
    ((drawn, _),) = draw_batches((x, y), 16, 1, seed=0)  # the options' data_seed
    fixed = dataclasses.replace(MC, mc_samples=3, seed=5, fold_bn=False)
    rows = estimate_hessian(net, (x, y), fixed, names=NAMES).probe_traces
    torch.testing.assert_close(rows, mc_channel_traces(net, NAMES, [drawn], 3, 5), rtol=1e-6, atol=0)
    rounds = dataclasses.replace(fixed, mc_samples=None, min_probes=2, check_every=2, max_probes=4, tol=None,
                                 rank_threshold=None, stderr_tol=1e-6)  # never met: two rounds of 2
    rows = estimate_hessian(net, (x, y), rounds, names=NAMES).probe_traces
    want = torch.cat([mc_channel_traces(net, NAMES, [drawn], 2, 5 + r * SEED_STRIDE) for r in range(2)])
    torch.testing.assert_close(rows, want, rtol=1e-6, atol=0)


def test_without_psutil_the_available_memory_is_memavailable(monkeypatch):
    """No psutil: ``MemAvailable`` of ``/proc/meminfo``, in kB, as bytes; a fraction of it is
    the budget."""
    import io
    import sys

    from ehap_fx.scoring import budget

    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil raises ImportError
    meminfo = "MemTotal:        4096 kB\nMemFree:          512 kB\nMemAvailable:    1536 kB\n"
    monkeypatch.setattr(budget, "open", lambda path: io.StringIO(meminfo), raising=False)
    assert budget.available_memory(torch.device("cpu")) == 1536 * 1024
    assert budget.resolve_budget(0.5, torch.device("cpu")) == (768 * 1024, "memory_budget=0.5 of 1.50 MiB available")


def test_a_budget_over_one_is_bytes_up_to_one_a_fraction_and_unreadable_memory_no_limit(monkeypatch):
    """``memory_budget`` > 1 is a byte count (whatever is free), 1 itself is all the available
    memory, and with nothing readable a fraction sets no limit (2⁶², said so) rather than a guess."""
    from ehap_fx.scoring import budget

    cpu = torch.device("cpu")
    monkeypatch.setattr(budget, "available_memory", lambda device: 3 * 2**20)
    assert budget.resolve_budget(1.0, cpu) == (3 * 2**20, "memory_budget=1 of 3.00 MiB available")
    assert budget.resolve_budget(1.5, cpu) == (1, "memory_budget=0.0 KiB")
    assert budget.resolve_budget(2.0**21, cpu) == (2**21, "memory_budget=2.00 MiB")
    monkeypatch.setattr(budget, "available_memory", lambda device: None)
    assert budget.resolve_budget(0.5, cpu) == (2**62, "memory_budget unbounded (available memory unreadable)")
    assert budget.resolve_budget(2.0**21, cpu)[0] == 2**21


def test_unreadable_meminfo_without_psutil_is_no_available_memory(monkeypatch):
    import sys

    from ehap_fx.scoring import budget

    def refuse(path):
        raise PermissionError(path)

    monkeypatch.setitem(sys.modules, "psutil", None)
    monkeypatch.setattr(budget, "open", refuse, raising=False)
    assert budget.available_memory(torch.device("cpu")) is None


def test_on_cuda_the_available_memory_is_the_free_bytes_not_the_total(monkeypatch):
    """``mem_get_info`` answers ``(free, total)``: the budget is a fraction of what is free."""
    from ehap_fx.scoring import budget

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (3 * 2**30, 80 * 2**30))
    assert budget.available_memory(torch.device("cuda:0")) == 3 * 2**30


def test_saved_bytes_count_what_autograd_keeps_with_and_without_autocast():
    """Linear (5 → 4) → ReLU → linear (4 → 3) on one sample: fp32 keeps the input (5) and the
    ReLU output (4), 36 bytes (the weights are the model's own); under bf16 autocast the input,
    both cast weights (20 + 12) and the ReLU output, in 2 bytes each: 82."""
    from functools import partial

    from ehap_fx.scoring.budget import saved_bytes_per_sample

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    saved, out = saved_bytes_per_sample(net, torch.randn(1, 5))
    assert saved == 4 * (5 + 4) and out.dtype == torch.float32
    saved, out = saved_bytes_per_sample(net, torch.randn(1, 5), partial(torch.autocast, "cpu", dtype=torch.bfloat16))
    assert saved == 2 * (5 + 20 + 4 + 12) and out.dtype == torch.bfloat16


def test_saved_bytes_leave_out_the_models_buffers_as_its_weights():
    """A buffer autograd saves (a fixed gain ``x · g``: the product keeps ``g`` for ``x``'s
    gradient, and eval BatchNorm its running statistics) is the model's own memory, like a
    weight: Linear (5 → 4) → ``· g`` → linear (4 → 3) keeps the input (5) and the product (4),
    36 bytes, not 52 with ``g``'s 4 floats; the eval BN model keeps input, BN input and ReLU
    output, 52, not 84 with the two running statistics."""
    from ehap_fx.scoring.budget import saved_bytes_per_sample

    class Gain(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("g", torch.randn(1, 4))

        def forward(self, x):
            return x * self.g

    torch.manual_seed(0)
    gain = nn.Sequential(nn.Linear(5, 4), Gain(), nn.Linear(4, 3))
    assert saved_bytes_per_sample(gain, torch.randn(1, 5))[0] == 4 * (5 + 4)
    bn = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3)).eval()
    assert saved_bytes_per_sample(bn, torch.randn(1, 5))[0] == 4 * (5 + 4 + 4)


@pytest.mark.parametrize("batch", [4, 64])
def test_the_plans_per_sample_bytes_do_not_grow_with_the_batch(batch):
    """Linear (5 → 4) → ReLU → linear (4 → 3), fp32, one sample per chunk: autograd keeps A = 36
    bytes per sample (``test_saved_bytes_count_what_autograd_keeps_with_and_without_autocast``;
    it once counted the whole batch the sample was sliced from). MC: 3A + R·(4 + 4), R = 6 the
    first linear's reduction buffer (its 5 inputs and a 1×1 Gram); exact GGN:
    2·(A + 3·(32 weights · 4 + A)) with 3 classes."""
    from ehap_fx.scoring.hessian import choose_estimator

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    x, y = torch.randn(batch, 5), torch.randint(0, 3, (batch,))
    opts = HessianOptions(dtype="fp32", batch_size=batch, progress=False, mc_chunk=1, ggn_chunk=1)
    mc = choose_estimator(net, (x, y), dataclasses.replace(opts, estimator="mc"), names=["0", "2"])
    assert (mc.estimator, mc.mc_chunk, mc.footprint) == ("mc", 1, 3 * 36 + 6 * 8)
    every = choose_estimator(net, (x, y), dataclasses.replace(opts, estimator="mc"))  # names: every linear
    assert (every.estimator, every.mc_chunk, every.footprint) == (mc.estimator, mc.mc_chunk, mc.footprint)
    ggn = choose_estimator(net, (x, y), dataclasses.replace(opts, estimator="ggn"), names=["0", "2"])
    assert (ggn.estimator, ggn.ggn_chunk, ggn.footprint) == ("ggn", 1, 2 * (36 + 3 * (32 * 4 + 36)))
    assert ggn.mc_chunk == 0  # an exact plan runs no MC pass, as a Hutchinson one (below)
    # Hutchinson: 3A for every sample of the batch (no chunks); MC chunks cap at the batch
    hutch = choose_estimator(net, (x, y), dataclasses.replace(opts, estimator="hutchinson"), names=["0", "2"])
    assert (hutch.estimator, hutch.mc_chunk, hutch.footprint) == ("hutchinson", 0, 3 * 36 * batch)
    two = choose_estimator(net, (x, y), dataclasses.replace(opts, estimator="mc", mc_chunk=2), names=["0", "2"])
    assert (two.mc_chunk, two.footprint) == (2, 2 * (3 * 36 + 6 * 8))
    big = choose_estimator(net, (x, y), dataclasses.replace(opts, estimator="mc", mc_chunk=1000), names=["0", "2"])
    assert (big.mc_chunk, big.footprint) == (batch, batch * (3 * 36 + 6 * 8))
    with pytest.raises(dataclasses.FrozenInstanceError):  # a plan is a value (rank 0 broadcasts it)
        big.mc_chunk = 1


@pytest.mark.parametrize(("layers", "shape", "worst"), [
    # grouped conv 4 -> 6 (2 groups), 3x3 on 5x5: T = 9, K = 2·9 = 18 per group, C = 6; direct
    # (T²(K + C) = 1,944 per group against C·T·K/G = 972): unfolded input G·K·T = 324 + gradient C·K = 108
    ([nn.Conv2d(4, 6, 3, groups=2)], (1, 4, 5, 5), 2 * 18 * 9 + 6 * 18),
    # conv 16 -> 32, 3x3 on 6x6: T = 16, K = 144, C = 32; Gram (T²(K + C) = 45,056 < C·T·K = 73,728):
    # unfolded input K·T = 2,304 + the T×T Gram 256
    ([nn.Conv2d(16, 32, 3)], (1, 16, 6, 6), 144 * 16 + 16 * 16),
    # linear 5 -> 3 over 7 tokens: T = 7, K = 5, C = 3; direct: K·T = 35 + C·K = 15
    ([nn.Linear(5, 3)], (1, 7, 5), 5 * 7 + 3 * 5),
    # linear 4 -> 4 over 2 tokens: a tie, T²(K + C) = 4·8 = 32 = C·T·K; the reduction takes the
    # Gram only when strictly cheaper (``im2col_sq_norms``): direct, K·T + C·K
    ([nn.Linear(4, 4)], (1, 2, 4), 4 * 2 + 4 * 4),
    # a chain of two: the larger buffer (the 1x1 conv's: K·T = 54, direct C·K = 12)
    ([nn.Conv2d(4, 6, 3, groups=2), nn.Conv2d(6, 2, 1)], (1, 4, 5, 5), 2 * 18 * 9 + 6 * 18),
])
def test_the_mc_reduction_buffer_is_the_largest_layers_unfolded_input_and_gradient_or_gram(layers, shape, worst):
    """``ReduceSize.worst``: per sample, the largest layer's unfolded input plus its per-sample
    weight gradient, or its T×T Gram matrix where that costs fewer multiplies (counted by hand)."""
    from ehap_fx.scoring.ggn_mc import ReduceSize

    net = nn.Sequential(*layers)
    with ReduceSize(net, [str(i) for i in range(len(layers))]) as sizes:
        net(torch.randn(*shape))
    assert sizes.worst == worst
    assert not net[0]._forward_hooks  # the hooks are gone with the context


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 3, 3, padding=1), nn.Linear(3, 4)

    def forward(self, x):
        return self.head(self.conv(self.conv(x)).mean((2, 3)))


class _InPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 3, 3, padding=1), nn.Linear(3, 4)

    def forward(self, x):
        a = x + 1
        out = self.conv(a)
        a.mul_(2)  # the conv's input changed after the conv read it
        return self.head(out.mean((2, 3)) + a.mean((2, 3)))


def test_mc_traces_refuse_a_module_run_twice_and_an_input_changed_in_place():
    """The squared norm of a per-sample gradient summed over two calls is not the sum of the
    calls' squared norms; a reduction on an input changed in place would read the wrong values.
    Both are a ``HessianError`` naming the module (the twice-run conv left out, the rest runs), as
    is an output that is not ``(N, classes)`` logits."""
    from ehap_fx.errors import HessianError
    from ehap_fx.scoring.ggn_mc import mc_channel_traces

    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5)
    in_place = _InPlace().requires_grad_(False)  # as the estimator runs: gradients flow to the input
    with pytest.raises(HessianError, match="module 'conv' runs 2 times per forward"):
        mc_channel_traces(_Twice(), ["conv", "head"], [x], 1, 0)
    assert mc_channel_traces(_Twice(), ["head"], [x], 1, 0).shape == (1, 4)
    with pytest.raises(HessianError, match="the input of module 'conv' was modified in place"):
        mc_channel_traces(in_place, ["conv"], [x], 1, 0)  # before autograd's own, unnamed error
    for wrap in (False, True):  # per-pixel logits, bare or in a tuple: no softmax over classes to draw from
        with pytest.raises(HessianError, match=r"needs \(N, classes\) logits; the model returned"):
            mc_channel_traces(_Dense(wrap), ["conv"], [x[:, :, :2, :2]], 1, 0)


def test_byte_counts_print_in_the_largest_unit_they_reach():
    from ehap_fx.scoring.budget import fmt_bytes

    assert fmt_bytes(2**30) == "1.00 GiB" and fmt_bytes(2**30 - 2**20) == "1023.00 MiB"
    assert fmt_bytes(2**20) == "1.00 MiB" and fmt_bytes(2**20 - 2**9) == "1023.5 KiB"
