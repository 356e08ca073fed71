"""ehap-fx: Hessian-aware structured pruning, INT8 QAT and ONNX export as torch.fx passes.

>>> import torch
>>> from ehap_fx import Target, compress
>>> from ehap_fx.models import get_model
>>> result = compress(get_model("resnet20"), torch.randn(1, 3, 32, 32),
...                   target=Target(macs=0.5), scorer="l1")  # doctest: +SKIP
"""

__version__ = "0.1.0"

from ehap_fx.compress import CompressReport, CompressResult, compress
from ehap_fx.target import Target

__all__ = ["CompressReport", "CompressResult", "Target", "compress", "__version__"]
