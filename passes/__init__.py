"""The ehap-fx graph passes, one per module, each usable alone on a ``torch.fx.GraphModule``.

Each returns torch.fx's ``PassResult`` (``group_channels``, ``mask_channels``, ``shrink``,
``count_cost``, ...) or, where torch has no convention, a named result (``trace`` → the
``GraphModule``; ``quantize`` → ``QuantizeResult``; ``export`` → ``ExportReport``). Three have
``PassBase`` wrappers for a ``PassManager``: ``GroupChannels``, ``Shrink``, ``CountCost``.
docs/architecture.md says where a new pass goes.
"""
