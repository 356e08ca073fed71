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
import sys
import types

__version__ = "0.1.0"

_LAZY = {
    "CompressReport": "ehap_fx.compress",
    "CompressResult": "ehap_fx.compress",
    "RECIPE": "ehap_fx.compress",
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


class _Face(types.ModuleType):
    """Importing the submodule ``ehap_fx.compress`` would bind the package attribute
    ``compress`` to that module; the public name is the function, as in an eager face."""

    def __setattr__(self, name: str, value) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Face
