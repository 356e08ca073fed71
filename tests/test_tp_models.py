"""Torch-Pruning's own test models (``tests/tp_models.py``) through the public API:
``compress(model, example_input)`` with nothing but a target. Each prunes where its
structure allows, equals the masked original, and keeps every output's shape; where nothing
can go without changing an output, the error says which pins hold the channels."""

import pytest
import torch
from ehap_fx.passes.group import group_channels
from ehap_fx.passes.mask import mask_channels
from ehap_fx.passes.trace import call_with, trace

from ehap_fx.compress import compress
from ehap_fx.errors import TargetError
from ehap_fx.target import Target
from tests.tp_models import BUILDERS

pytestmark = pytest.mark.filterwarnings("ignore:compress\\(\\)")

#: modules whose output channels must shrink at 0.6 of the MACs, and those that must not
#: (an output's channels, a module called twice, ...)
SHRINKS = {
    "concat": ({"mlp.0", "mlp.4"}, {"mlp.8", "lin2"}),
    "cascaded_concat": ({"block4.0"}, {"output"}),
    "concat_split": ({"block1.3"}, {"block2.0"}),
    "non_feature_dim_cat": ({"conv1"}, {"conv2"}),
    "split": ({"block1.0"}, {"block2_1.0", "block2_2.0"}),
    "single_channel_output": ({"conv1"}, {"conv3"}),
    "reshape": ({"linear"}, {"up1", "up2", "final"}),  # up1's input channels go with linear's
}


def _leaves(out):
    return torch.utils._pytree.tree_leaves(out)


@pytest.mark.parametrize("name", sorted(SHRINKS))
def test_prunes_where_the_structure_allows(name):
    torch.manual_seed(0)
    model, x = BUILDERS[name]()
    model.eval()
    res = compress(model, x, target=Target(macs=0.6, round_to=1))
    assert res.report.cost_after["macs_ratio"] <= 0.6
    with torch.no_grad():
        dense, pruned = call_with(model, x), call_with(res.pruned, x)
        masked = call_with(mask_channels(group_channels(trace(model, x)).graph_module,
                                         res.pruned.meta["ehap.plan"]).graph_module, x)
    assert [t.shape for t in _leaves(pruned)] == [t.shape for t in _leaves(dense)]
    for got, want in zip(_leaves(pruned), _leaves(masked)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    before, after = res.report.channels_before, res.report.channels_after
    shrinks, stays = SHRINKS[name]
    assert all(after[m] < before[m] for m in shrinks), (before, after)
    assert all(after[m] == before[m] for m in stays), (before, after)


def test_split_prunes_the_unshared_piece_exactly():
    """block1's 32 outputs split [8, 8, 16]: the first two pieces feed one module twice
    (shared weights: pinned), the third block2_2 alone, so only those 16 can go."""
    model, x = BUILDERS["split"]()
    gm = group_channels(trace(model.eval(), x)).graph_module
    groups = gm.meta["ehap.groups"]
    (piece,) = [g for g in groups.prunable if any(m.module == "block1.3" and m.role == "out" for m in g.members)]
    assert piece.size == 16
    assert any("called 2 times" in (g.pinned or "") for g in groups.pinned)


def test_reshape_into_transposed_convs_prunes_the_decoder_input():
    """Linear → view (N, 64, 4, 4) merges 16 features per channel; the transposed conv after it
    reads those 64 channels at weight dim 0, so they go together (linear's 1024 features in
    blocks of 16, up1's weight rows); the transposed convs' outputs stay, pinned with a reason."""
    model, x = BUILDERS["reshape"]()
    gm = group_channels(trace(model.eval(), x)).graph_module
    groups = gm.meta["ehap.groups"]
    (g,) = [g for g in groups.prunable if any(m.module == "up1" for m in g.members)]
    assert g.size == 64
    ins = [m for m in g.members if m.module == "up1"]
    assert [(m.role, m.dim) for m in ins] == [("in", 0)]
    outs = [m for m in g.members if m.module == "linear"]
    assert [(m.role, tuple(m.index.shape)) for m in outs] == [("out", (64, 16))]
    assert any("ConvTranspose2d output channels" in (p.pinned or "") for p in groups.pinned)
    # up1 (64 → 32, 4×4 kernel, 4×4 → 8×8): every input element meets 16·32 weights, + a bias per output
    from ehap_fx.passes.cost import count_cost

    from ehap_fx import _meta

    count_cost(gm)
    (up1,) = [n for n in gm.graph.nodes if n.target == "up1"]
    assert (up1.meta[_meta.COST].macs, up1.meta[_meta.COST].params) == (4 * 4 * 16 * 64 * 32 + 32 * 8 * 8, 16 * 64 * 32 + 32)
    res = compress(model.eval(), x, target=Target(macs=0.6, round_to=1))
    assert res.pruned.get_submodule("up1").in_channels == res.pruned.get_submodule("linear").out_features // 16 < 64


def test_the_removal_criterion_names_a_transposed_conv_it_cannot_model():
    from ehap_fx.errors import HessianError
    from ehap_fx.scoring.removal import estimate_removal

    model, x = BUILDERS["reshape"]()
    gm = group_channels(trace(model.eval(), x)).graph_module
    with pytest.raises(HessianError, match="up1 reads its input channels at weight dim 0.*scorer='hessian'"):
        estimate_removal(gm, [(x, torch.zeros(len(x), dtype=torch.long))], gm.meta["ehap.groups"].prunable)


def test_multiple_inputs_and_outputs_keep_every_output():
    """Every channel reaches an output (x1, x2 and fc3's): nothing can go; the error says so."""
    model, x = BUILDERS["multiple_inputs_outputs"]()
    with pytest.raises(TargetError, match="model output"):
        compress(model.eval(), x, target=Target(macs=0.6, round_to=1))
    res = compress(model.eval(), x, target=Target(macs=1.0))  # the call itself works: nothing to do
    with torch.no_grad():
        assert [t.shape for t in _leaves(call_with(res.pruned, x))] == [(2, 32), (2, 32), (2, 100)]
