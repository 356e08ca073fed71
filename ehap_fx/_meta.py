"""Keys under which ehap-fx passes store analysis results in ``node.meta`` and ``gm.meta``.

Each key is defined here once; values are frozen dataclasses defined by the pass that writes
them. Re-tracing a module drops ``node.meta``: rerun the pass that wrote a key instead.
"""

# node.meta: the channel slots of the node's output along dim 1 (passes.group.ChannelSlots).
CHANNELS = "ehap.channels"
# node.meta: MACs and parameters of the node (passes.cost.NodeCost).
COST = "ehap.cost"
# gm.meta: the channel groups of the whole graph (passes.group.ChannelGroups).
GROUPS = "ehap.groups"
# gm.meta: the last pruning plan applied by shrink (passes.shrink.PrunePlan).
PLAN = "ehap.plan"
# node.meta: the channels the node's output keeps, as a tuple of indices into the channels of
# the graph before its first shrink (passes.shrink, composed over repeated shrinks).
KEPT = "ehap.kept"
# gm.meta: what the compensation pass repaired (passes.compensate.Compensation).
COMPENSATION = "ehap.compensation"
# gm.meta: True once QAT froze BatchNorm on its running statistics (passes.quantize, ehap_fx.qat).
BN_FROZEN = "ehap.bn_frozen"
# gm.meta: how torch.export captured the graph, to export it again (passes.trace.ExportCapture).
CAPTURE = "ehap.capture"
# gm.meta: the coupling rules a graph was traced or grouped with, when not the default
# (passes.coupling.Rules); group_channels, and so shrink's regrouping, read them.
RULES = "ehap.rules"
# gm.meta: which capture (torch.fx or torch.export) made the graph, and why (passes.capture.Captured).
CAPTURED = "ehap.captured"
