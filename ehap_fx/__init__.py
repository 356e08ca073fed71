"""ehap-fx: Hessian-aware structured pruning, INT8 QAT and ONNX export as torch.fx passes.

The package face costs nothing to import (PEP 562 ``__getattr__``): ``import
ehap_fx.passes.trace`` loads torch.fx and that pass only, not the Hessian code, tqdm or
torch.distributed; ``ehap_fx.compress`` loads the pipeline on first use.

>>> import torch
>>> from ehap_fx import Target, compress
>>> from ehap_fx.models import get_model
>>> result = compress(get_model("resnet20"), torch.randn(1, 3, 32, 32),
...                   target=Target(macs=0.5), scorer="l1")  # doctest: +SKIP
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "CompressReport": "ehap_fx.compress",
    "CompressResult": "ehap_fx.compress",
    "compress": "ehap_fx.compress",
    "Target": "ehap_fx.target",
}
__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ehap_fx' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
