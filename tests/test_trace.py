"""Trace pass: shapes on every node; untraceable models get an error that names the culprit."""

import pytest
import torch
from ehap_fx.passes.group import group_channels, groups_of
from ehap_fx.passes.trace import trace
from torch import nn

from ehap_fx.errors import TraceError


class DataDependent(nn.Module):
    """Branches on a tensor value: symbolic tracing cannot follow it."""

    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gate = DataDependent()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.gate(self.conv(x)))


def test_every_tensor_node_has_shapes():
    gm = trace(Net().eval(), torch.randn(2, 3, 8, 8), leaf_modules=["gate"])
    shapes = {n.name: tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes if n.op != "output"}
    assert shapes == {"x": (2, 3, 8, 8), "conv": (2, 8, 8, 8), "gate": (2, 8, 8, 8), "head": (2, 4, 8, 8)}


class _StoppedWhileTraced(nn.Module):
    """A forward that a library stops: a KeyboardInterrupt re-raised as another error (its cause)."""

    def forward(self, x):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise RuntimeError("a library stopped") from e


def test_ctrl_c_inside_the_fx_trace_stays_a_keyboard_interrupt():
    """Ctrl-C while FX traces is raised again as itself, not reported as an untraceable model."""
    with pytest.raises(KeyboardInterrupt):
        trace(_StoppedWhileTraced(), torch.randn(2, 3), capture="fx")


def test_untraceable_module_is_named_with_its_line_and_the_fix():
    with pytest.raises(TraceError) as err:
        trace(Net(), torch.randn(2, 3, 8, 8))
    msg = str(err.value)
    assert "submodule 'gate' (DataDependent)" in msg
    assert "test_trace.py" in msg and "if x.sum() > 0" in msg
    assert "leaf_modules=['gate']" in msg
    assert isinstance(err.value.__cause__, Exception)


def test_leaf_module_channels_are_pinned():
    gm = group_channels(
        trace(Net().eval(), torch.randn(2, 3, 8, 8), leaf_modules=[DataDependent])
    ).graph_module
    reasons = [g.pinned for g in groups_of(gm).pinned]
    assert any("gate" in r and "not understood" in r for r in reasons)
    assert not groups_of(gm).prunable


def test_wrong_input_shape_is_a_trace_error():
    with pytest.raises(TraceError, match="example_input"):
        trace(nn.Conv2d(3, 8, 3), torch.randn(2, 5, 8, 8))


class _Optional(torch.nn.Module):
    """forward(x, scale=None, shift=None): optional inputs, as a Hugging Face model has."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)

    def forward(self, x, scale=None, shift=None):
        h = self.conv(x)
        if scale is not None:
            h = h * scale
        return h if shift is None else h + shift


def test_a_dict_of_inputs_traces_the_given_ones_in_forwards_order():
    """``{name: tensor}`` in any order: the graph's inputs are exactly the given ones, in
    ``forward``'s order (``x``, then ``scale``), the absent ``shift`` specialised away."""
    torch.manual_seed(0)
    model, x, s = _Optional().eval(), torch.randn(2, 3, 5, 5), torch.rand(1, 4, 1, 1)
    gm = trace(model, {"scale": s, "x": x})
    assert [n.target for n in gm.graph.find_nodes(op="placeholder")] == ["x", "scale"]
    with torch.no_grad():
        torch.testing.assert_close(gm(x, s), model(x, scale=s))
    only_x = trace(model, {"x": x})
    assert [n.target for n in only_x.graph.find_nodes(op="placeholder")] == ["x"]


def test_a_program_decomposed_to_core_aten_is_recorded_as_such():
    """``gm.meta["ehap.capture"].decomposed``: a shrunk copy of a ``run_decompositions`` program
    is exported the same way (core ATen's ``convolution``/``addmm``), of a training-IR one not."""
    from ehap_fx import _meta

    model, x = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.Flatten(), torch.nn.Linear(64, 2)), torch.randn(2, 3, 4, 4)
    ep = torch.export.export(model.eval(), (x,))
    assert trace(ep.run_decompositions(), x).meta[_meta.CAPTURE].decomposed is True
    assert trace(ep, x).meta[_meta.CAPTURE].decomposed is False


def test_an_exported_graph_starts_in_eval_and_train_switches_batch_norm_and_dropout():
    """``ExportedGraph``: captured in eval mode and saying so; ``.train()`` sets the ``training``
    flag of every ``aten.batch_norm`` and ``aten.dropout`` call (batch statistics, dropped
    elements), ``.eval()`` clears it again."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.Dropout(0.5)).eval()
    x = torch.randn(4, 3, 5, 5)
    with torch.no_grad():
        model[1].running_mean.fill_(3.0)
        want_eval = model(x)
        want_train = torch.nn.functional.batch_norm(model[0](x), None, None, model[1].weight, model[1].bias,
                                                    training=True)
    gm = trace(model, x, capture="export")
    assert gm.training is False
    bn, drop = torch.ops.aten.batch_norm.default, torch.ops.aten.dropout.default

    def flags():  # the `train` argument of each call
        return [n.args[5] if n.target is bn else n.args[2] for n in gm.graph.nodes if n.target in (bn, drop)]

    assert flags() == [False, False]
    with torch.no_grad():
        torch.testing.assert_close(gm(x), want_eval)
        gm.train()
        assert gm.training and flags() == [True, True]
        got = gm(x)  # dropout zeroes about half and doubles the rest
        kept = got != 0
        torch.testing.assert_close(got[kept], 2 * want_train[kept], atol=1e-5, rtol=1e-5)
        gm.eval()
        assert not gm.training and flags() == [False, False]



def test_an_exported_batch_norm_without_running_statistics_keeps_batch_statistics_in_eval():
    """``BatchNorm2d(track_running_stats=False)`` normalises with the batch's own statistics in
    either mode: its exported call keeps ``training=True`` through ``.eval()`` and ``.train()``,
    and the graph computes what the module does."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4, track_running_stats=False)).eval()
    x = torch.randn(4, 3, 5, 5)
    gm = trace(model, x, capture="export")
    (bn,) = [n for n in gm.graph.nodes if n.target is torch.ops.aten.batch_norm.default]
    with torch.no_grad():
        want = torch.nn.functional.batch_norm(model[0](x), None, None, model[1].weight, model[1].bias, training=True)
        for mode in (False, True, False):
            gm.train(mode)
            assert bn.args[5] is True
            torch.testing.assert_close(gm(x), want)


def test_an_in_place_dropout_switches_with_the_exported_graph():
    """``nn.Dropout(inplace=True)`` exports as ``aten.dropout_``: ``.train()`` sets its ``train``
    argument (about half the elements dropped, the rest doubled), ``.eval()`` clears it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.Dropout(0.5, inplace=True)).eval()
    x = torch.randn(4, 3, 5, 5)
    gm = trace(model, x, capture="export")
    (drop,) = [n for n in gm.graph.nodes if n.target is torch.ops.aten.dropout_.default]
    with torch.no_grad():
        conv = model[0](x)
        gm.train()
        assert drop.args[1:] == (0.5, True)
        got = gm(x)
        kept = got != 0
        assert 0.3 < kept.float().mean() < 0.7
        torch.testing.assert_close(got[kept], 2 * conv[kept])
        gm.eval()
        assert drop.args[1:] == (0.5, False)
        torch.testing.assert_close(gm(x), conv)


class _Ignores(torch.nn.Module):
    """forward(x, mask=None, extra=None) reads only x."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)

    def forward(self, x, mask=None, extra=None):
        return self.conv(x)


def test_a_given_input_the_model_does_not_read_stays_an_input():
    """An input given in ``example_input`` is a graph input even when forward ignores it
    (a mask some models take and do not use); the ones not given are dropped."""
    torch.manual_seed(0)
    model, x, extra = _Ignores().eval(), torch.randn(2, 3, 5, 5), torch.ones(1)
    gm = trace(model, {"x": x, "extra": extra})
    assert [n.name for n in gm.graph.find_nodes(op="placeholder")] == ["x", "extra"]
    gm = trace(model, (x, extra))
    assert [n.name for n in gm.graph.find_nodes(op="placeholder")] == ["x", "mask"]
    with torch.no_grad():
        torch.testing.assert_close(gm(x, extra), model(x))


def test_an_export_from_a_one_sample_example_keeps_the_batch_dynamic():
    """torch.export would fix a batch of 1 into the graph: the capture exports a batch of two
    instead, so the graph (and the program exported from it again) take any batch."""
    from ehap_fx.passes.program import exported_program

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    gm = trace(model, torch.randn(1, 3, 8, 8), capture="export")
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))
        torch.testing.assert_close(exported_program(gm).module()(x), model(x))

class _Tempered(torch.nn.Module):
    """conv (3 → 4) of x ``(N, 3, H, W)``, divided by a temperature ``t`` (a 0-d tensor) and
    times a weight per sample ``w`` ``(N,)``."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x, t, w):
        return self.conv(x) / t * w[:, None, None, None]


def test_a_zero_dim_input_has_no_batch_and_leaves_the_others_dynamic():
    """One-sample x and w are exported as batches of two with a dynamic batch dim (dim 0 of
    both); the 0-d ``t`` is left as it is, with no batch dim: the graph takes a batch of 3."""
    from ehap_fx import _meta

    torch.manual_seed(0)
    model = _Tempered().eval()
    gm = trace(model, (torch.randn(1, 3, 8, 8), torch.tensor(2.0), torch.rand(1)), capture="export")
    capture = gm.meta[_meta.CAPTURE]
    assert [tuple(a.shape) for a in capture.args] == [(2, 3, 8, 8), (), (2,)]
    assert [None if d is None else list(d) for d in capture.dynamic_shapes] == [[0], None, [0]]
    x, t, w = torch.randn(3, 3, 8, 8), torch.tensor(0.5), torch.rand(3)
    with torch.no_grad():
        torch.testing.assert_close(gm(x, t, w), model(x, t, w))


class _Related(torch.nn.Module):
    """conv (3 → 4) of x ``(n, 3, H, W)`` plus y ``(n, 4, H, W)`` plus z ``(2n, 1, 1, 1)``
    summed in pairs: three inputs whose dim 0 are n, n and 2n."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x, y, z):
        return self.conv(x) + y + z.reshape(x.shape[0], 2, 1, 1, 1).sum(1)


def test_a_program_with_related_input_sizes_is_exported_again_with_its_ranges():
    """A user's program with ``n`` in [2, 64] for x and y and ``2n`` for z: the traced graph
    exports again (``exported_program``) with the same ranges, one ``Dim`` shared by x and y and
    z's derived from it, and the result takes n = 3 (z of 6) as the model does."""
    from ehap_fx.passes.program import exported_program

    from ehap_fx import _meta

    torch.manual_seed(0)
    model, n = _Related().eval(), torch.export.Dim("n", min=2, max=64)
    x, y, z = torch.randn(4, 3, 5, 5), torch.randn(4, 4, 5, 5), torch.randn(8, 1, 1, 1)
    ep = torch.export.export(model, (x, y, z), dynamic_shapes=({0: n}, {0: n}, {0: 2 * n}))
    gm = trace(ep, None)
    (dx,), (dy,), (dz,) = (d.values() for d in gm.meta[_meta.CAPTURE].dynamic_shapes)
    assert dx is dy and (dx.min, dx.max) == (2, 64)
    again = exported_program(gm)
    assert sorted(str(r) for r in again.range_constraints.values()) == ["VR[2, 64]", "VR[4, 128]"]
    x, y, z = torch.randn(3, 3, 5, 5), torch.randn(3, 4, 5, 5), torch.randn(6, 1, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(again.module()(x, y, z), model(x, y, z))


def test_an_exported_graph_saves_and_loads_as_a_whole_module():
    """``torch.save`` of an export-captured graph (pickled whole) loads back into a module that
    computes what the model does (the unlifted graph's tracer class could not be rebuilt)."""
    import io

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    gm = trace(model, torch.randn(2, 3, 8, 8), capture="export")
    buffer = io.BytesIO()
    torch.save(gm, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


class _Decode(torch.nn.Module):
    """YOLO pose's keypoint decoding: ``y[:, 2::3] = y[:, 2::3].sigmoid()`` after a conv."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 9, 1)

    def forward(self, x):
        y = self.conv(x).clone()
        y[:, 2::3] = y[:, 2::3].sigmoid()
        y[:, :, 1:3, 0:2] = 2 * y[:, :, 1:3, 0:2]  # two dims sliced: one index tuple
        return y


def test_an_exported_slice_copy_becomes_one_assignment():
    """``copy_(slice(...), src)`` becomes ``base[index] = src`` (``operator.setitem``), one index
    tuple per chain of slices, with the same values: no ``aten.copy_`` is left."""
    import operator

    torch.manual_seed(0)
    model, x = _Decode().eval(), torch.randn(2, 3, 4, 4)
    gm = trace(model, x, capture="export")
    assert not gm.graph.find_nodes(op="call_function", target=torch.ops.aten.copy_.default)
    puts = gm.graph.find_nodes(op="call_function", target=operator.setitem)
    assert [len(p.args[1]) for p in puts] == [2, 4]  # dims 0-1, then 0-3 (H and W in one tuple)
    assert puts[0].args[1][1].step == 3 and puts[1].args[1][2:] == (slice(1, 3, 1), slice(0, 2, 1))
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


class _SliceOfASlice(torch.nn.Module):
    """``y[:, 1:7][:, ::2] = ...``: two slices of dim 1, channels 1, 3 and 5 written."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 9, 1)

    def forward(self, x):
        y = self.conv(x).clone()
        y[:, 1:7][:, ::2] = y[:, :3].sigmoid()
        return y


def test_a_copy_into_two_slices_of_one_dim_stays_a_copy():
    """One index tuple cannot say "every other of channels 1:7": the copy stays, and the
    exported graph writes channels 1, 3, 5 (not 0, 2, 4) as the model does."""
    torch.manual_seed(0)
    model, x = _SliceOfASlice().eval(), torch.randn(2, 3, 4, 4)
    gm = trace(model, x, capture="export")
    assert len(gm.graph.find_nodes(op="call_function", target=torch.ops.aten.copy_.default)) == 1
    with torch.no_grad():
        expected = model.conv(x)
        expected[:, 1:7:2] = expected[:, :3].sigmoid()
        torch.testing.assert_close(gm(x), expected)


class _UsedCopy(torch.nn.Module):
    """A slice copy whose result is read again: ``z = y[:, :2].copy_(2 * y[:, 2:])``."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.conv(x).clone()
        z = y[:, :2].copy_(2 * y[:, 2:])
        return y + z.sum()


def test_a_slice_copy_whose_result_is_used_stays_a_copy():
    """The assignment has no result: a copy that something reads is left as it is."""
    model, x = _UsedCopy().eval(), torch.randn(2, 3, 4, 4)
    gm = trace(model, x, capture="export")
    assert len(gm.graph.find_nodes(op="call_function", target=torch.ops.aten.copy_.default)) == 1
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


class _FixedBatch(torch.nn.Module):
    """A conv whose output is viewed with the batch written in (3): no dynamic batch exports."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x).reshape(3, -1)


def test_a_model_that_fixes_its_batch_is_exported_static_as_training_ir():
    """The dynamic-batch export fails, so the capture falls back to the static one: no dynamic
    shapes, and not decomposed (the graph is the training IR: ``aten.conv2d``), so that
    ``exported_program`` does not decompose a shrunk copy to core ATen."""
    from ehap_fx import _meta

    torch.manual_seed(0)
    model, x = _FixedBatch().eval(), torch.randn(3, 3, 4, 4)
    gm = trace(model, x, capture="export")
    capture = gm.meta[_meta.CAPTURE]
    assert capture.dynamic_shapes is None and capture.decomposed is False
    assert torch.ops.aten.conv2d.default in {n.target for n in gm.graph.nodes}


def test_the_exported_batch_ranges_from_one_to_65536():
    """The dynamic batch dim the capture gives torch.export is ``Dim("batch", min=1,
    max=65536)``: the program exported again from the graph declares that range (a batch of
    one included, though the capture exported a batch of two)."""
    from ehap_fx.passes.program import exported_program

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    gm = trace(model, torch.randn(1, 3, 8, 8), capture="export")
    assert [str(r) for r in exported_program(gm).range_constraints.values()] == ["VR[1, 65536]"]


def test_a_program_whose_batch_may_be_one_is_exported_again_with_that_range():
    """A user's program with ``n`` in [1, 8]: the ``Dim`` rebuilt from its range keeps the lower
    bound 1 (only a bound below 1 is raised to 1), so the exported copy still takes one sample."""
    from ehap_fx.passes.program import exported_program

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    n = torch.export.Dim("n", min=1, max=8)
    ep = torch.export.export(model, (torch.randn(2, 3, 8, 8),), dynamic_shapes=({0: n},))
    again = exported_program(trace(ep, None))
    assert [str(r) for r in again.range_constraints.values()] == ["VR[1, 8]"]


class _Snake(nn.Module):
    """x + sin²(x): channel c of the output from channel c of the input alone."""

    def forward(self, x):
        return x + torch.sin(x) ** 2


def test_the_rules_given_to_trace_are_recorded_on_the_graph_for_grouping():
    """``trace(..., rules=)`` keeps a module its rules describe as one call and records the rules
    in ``gm.meta``, so ``group_channels`` (given none) groups with them: conv0's channels go
    through the snake to conv1 and prune. Traced without rules, the graph records none."""
    from ehap_fx.passes._analysis import Rules
    from ehap_fx.passes._shape_rules import same_channels

    from ehap_fx import _meta

    rules = Rules(modules={_Snake: same_channels})
    model, x = nn.Sequential(nn.Conv2d(3, 8, 3), _Snake(), nn.Conv2d(8, 4, 1)).eval(), torch.randn(2, 3, 8, 8)
    gm = trace(model, x, capture="fx", rules=rules)
    assert gm.meta[_meta.RULES] is rules
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0", "1", "2"]
    (group,) = groups_of(group_channels(gm).graph_module).prunable
    assert {(m.module, m.role) for m in group.members} == {("0", "out"), ("2", "in")}
    assert _meta.RULES not in trace(model, x, capture="fx").meta


def test_ctrl_c_inside_the_static_export_stays_a_keyboard_interrupt(monkeypatch):
    """The dynamic-batch export fails (a model may fix its batch) and the static one is tried:
    a KeyboardInterrupt torch re-raised as another error there is raised again as itself, not
    reported as an uncapturable model."""
    calls = []

    def export(*args, **kwargs):
        calls.append(kwargs.get("dynamic_shapes"))
        if len(calls) == 1:
            raise RuntimeError("the batch is fixed")
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise RuntimeError("export stopped") from e

    monkeypatch.setattr(torch.export, "export", export)
    with pytest.raises(KeyboardInterrupt):
        trace(nn.Sequential(nn.Conv2d(3, 4, 1)), torch.randn(2, 3, 4, 4), capture="export")
    assert len(calls) == 2 and calls[0] is not None and calls[1] is None


class _AddmmAndConv(nn.Module):
    """conv (3 → 4) ─▶ pool ─▶ ``torch.addmm(b, x, w.t())`` (4 → 2): a training-IR program that
    holds core ATen's ``addmm`` beside ``aten.conv2d``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.w, self.b = nn.Parameter(torch.randn(2, 4)), nn.Parameter(torch.randn(2))

    def forward(self, x):
        return torch.addmm(self.b, self.conv(x).mean((2, 3)), self.w.t())


def test_a_training_ir_program_with_one_core_aten_op_is_not_taken_for_core_aten():
    """A user's ExportedProgram is recorded as core ATen only when no training-IR op is left:
    an ``addmm`` the user wrote beside an ``aten.conv2d`` is still training IR (re-exported
    without decomposing); the same program decomposed is core ATen."""
    from ehap_fx import _meta

    x = torch.randn(2, 3, 4, 4)
    ep = torch.export.export(_AddmmAndConv().eval(), (x,))
    targets = {n.target for n in ep.graph.nodes}
    assert torch.ops.aten.addmm.default in targets and torch.ops.aten.conv2d.default in targets
    assert trace(ep, x).meta[_meta.CAPTURE].decomposed is False
    assert trace(ep.run_decompositions(), x).meta[_meta.CAPTURE].decomposed is True
