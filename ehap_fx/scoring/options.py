"""What a Hessian (or removal) estimate is asked to do: :class:`HessianOptions`, validated once,
and the names its fields take (``ESTIMATORS``, ``DTYPES``, ``HVPS``).

>>> HessianOptions().estimator, HessianOptions().dtype
('auto', 'auto')
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ESTIMATORS = ("auto", "ggn", "mc", "hutchinson", "hybrid")
SEED_STRIDE = 1_000_003
"""Round (or chunk) ``c`` of probes or label draws is seeded ``seed + c * SEED_STRIDE``."""
HVPS = ("double_backward", "forward_over_reverse")


@dataclass(frozen=True)
class HessianOptions:
    """How to estimate the per-channel Hessian traces.

    ``probes`` fixes the probe count; otherwise probing stops between ``min_probes`` and
    ``max_probes`` once every enabled rule holds at a check (every ``check_every`` probes):
    relative L1 change of the traces since the last check ``< tol``, Spearman of successive
    channel (or group) rankings ``>= rank_threshold``, summed standard error over summed
    |trace| ``<= stderr_tol``. ``None`` disables a rule. The MC estimator draws
    ``mc_samples`` labels per input (``None``: the same stop rule, counted in draws).

    ``memory_budget``: bytes (``> 1``) or a fraction of the memory available when the
    estimate starts (``<= 1``); every pass is sized to it before it allocates (chunks, the
    ``"auto"`` choice), or refused with ``MemoryBudgetError``.
    """

    estimator: str = "auto"
    dtype: str = "auto"
    amp: str = "cast"  # "cast": run a half-precision copy; "autocast": fp32 weights + autocast
    batch_size: int = 256
    n_batches: int = 1
    probes: int | None = None
    min_probes: int = 20
    max_probes: int = 200
    check_every: int = 10
    tol: float | None = 0.02
    rank_threshold: float | None = 0.98
    stderr_tol: float | None = None
    probe_batch: int = 1
    hvp: str = "double_backward"
    channels_last: bool = False
    fold_bn: bool = True  # fold eval BatchNorm into the conv before it (exact; fewer ops per probe)
    loss_scale: float | None = None  # None: 2**16 for fp16, no scaling otherwise
    max_retries: int = 30
    ggn_chunk: int = 8  # samples per vmapped GGN chunk: memory ~ chunk × classes × weights
    exact_max_classes: int = 100  # "auto": the exact GGN up to this many classes (time ∝ classes)
    mc_samples: int | None = 2  # label draws per input for "mc" (None: the stop rule decides)
    mc_chunk: int | None = None  # samples per MC forward/backward (None: from the budget)
    memory_budget: float = 0.5
    seed: int = 0  # probes
    data_seed: int = 0  # which samples form the Hessian batches
    progress: bool = True

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator={self.estimator!r} must be one of {ESTIMATORS}")
        if self.dtype not in (*DTYPES, "auto"):
            raise ValueError(f"dtype={self.dtype!r} must be 'auto', 'fp16', 'bf16' or 'fp32'")
        if self.amp not in ("cast", "autocast"):
            raise ValueError(f"amp={self.amp!r} must be 'cast' or 'autocast'")
        if self.hvp not in HVPS:
            raise ValueError(f"hvp={self.hvp!r} must be one of {HVPS}")
        self._check_counts()
        if self.probes is not None and self.probes < 1:
            raise ValueError(f"probes={self.probes} must be >= 1 or None")
        if self.min_probes > self.max_probes:
            raise ValueError(f"min_probes={self.min_probes} > max_probes={self.max_probes}")
        if self.loss_scale is not None and not self.loss_scale > 0:
            raise ValueError(f"loss_scale={self.loss_scale} must be > 0 or None")
        if self.max_retries < 0:
            raise ValueError(f"max_retries={self.max_retries} must be >= 0")
        if self.hvp == "forward_over_reverse" and self.probe_batch > 1:
            raise ValueError(f"probe_batch={self.probe_batch} needs hvp='double_backward'")
        if not self.memory_budget > 0:
            raise ValueError(f"memory_budget={self.memory_budget} must be > 0 (bytes, or a "
                             "fraction of the available memory when <= 1)")
        for name in ("mc_samples", "mc_chunk"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1 or None")
        for name in ("tol", "rank_threshold", "stderr_tol"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                raise ValueError(f"{name}={value} must be in (0, 1] or None")

    def _check_counts(self) -> None:
        for name in ("batch_size", "n_batches", "min_probes", "max_probes", "check_every",
                     "probe_batch", "ggn_chunk", "exact_max_classes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
