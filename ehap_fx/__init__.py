"""ehap-fx: Hessian-aware structured pruning, INT8 QAT and ONNX export as torch.fx passes."""

__version__ = "0.1.0"
