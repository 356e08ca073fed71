"""The ehap-fx graph passes, one per module, each usable alone on a ``torch.fx.GraphModule``.

Each returns torch.fx's ``PassResult`` (``group_channels``, ``mask_channels``, ``shrink``,
``count_cost``, ...) or, where torch has no convention, a named result (``trace`` → the
``GraphModule``; ``quantize`` → ``QuantizeResult``; ``export`` → ``ExportReport``). Three have
``PassBase`` wrappers for a ``PassManager``: ``GroupChannels``, ``Shrink``, ``CountCost``.
``coupling`` holds the channel-coupling rules as values (``Rules``) and says how to add one
for a module of your own. docs/architecture.md says where a new pass or rule goes.
"""
