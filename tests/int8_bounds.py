"""How far onnxruntime's INT8 logits may lie from PyTorch's, in output quantization steps.

Where the two can differ. Both run the same integer arithmetic: the scheme keeps every u8·s8
pair sum inside int16 on the CPU in use (docs/int8.md), so the int32 accumulators of a conv
or a gemm are exact on both sides. They differ only where a value is *rounded* back onto a
uint8 grid: a ``QuantizeLinear``, or a kernel that requantizes its result (``QLinearConv``,
``QLinearAdd``, ``QLinearGlobalAveragePool``, ``QGemm``, ...). Each computes
``round(acc · M) + zp`` with its own float multiplier ``M`` and tie rule, so from equal inputs
the two outputs differ by at most one step of that tensor. Given equal inputs, then, the
logits differ by a sum of such one-step errors, one per rounding point, each carried on by
the layers after it; padding, slicing, flattening and max pooling copy values and add none.

The bound. If a one-step error at any rounded tensor moved the logits by at most one output
step, ``R`` rounding points would allow at most ``R`` output steps. That premise is *not*
implied by the weights: the worst-case gain of a conv in step units (``Σ|w|·s_in/s_out`` over
a row, every input off by one step in the worst direction) is well above 1, and its product
over 20 layers bounds nothing. It holds in practice because the errors are sparse (two
roundings disagree only near a tie) and the global average pool divides what reaches the
classifier by ``H·W``. Measured ``max_diff_steps`` against ``R`` (x86_64 AVX-512 VNNI,
2026-12-07, on each test's own inputs): pruned ResNet-20 option A and B, FX QAT and PTQ
(test_export, 512 inputs): 2.0 of R = 33 (3-6 in earlier runs, docs/int8.md); the small PT2E
net of test_export: 1.0 of R = 5; TinyOptionA through PT2E (test_export_capture): 0.0 of
R = 15; ResNet-56, the CLI's default run (test_cli, 64 synthetic images): 1.0 of R = 87;
ResNet-56 FX PTQ on the 10,000 CIFAR-10 test images (docs/int8.md, 2026-12-01): 7-8 of
R ≈ 87. So ``R`` holds with a margin of 5x or more wherever measured. It is a bound on
rounding, not a detector of every arithmetic error: saturated int16 pair sums (8-bit weights on AVX2) gave 5.0 steps on the small PT2E net,
whose R is 5; test_export keeps its empirical ``<= 2`` there (measured 1.0 with the right
weight range, 5.0 without), and ``tests/test_isa.py`` checks the arithmetic itself.
"""

from __future__ import annotations

from collections.abc import Mapping

#: ONNX ops that write a freshly rounded uint8/int8 tensor (``QLinear*`` and ``QGemm``
#: requantize an accumulator, ``QuantizeLinear`` rounds a float). ``ConvInteger`` and
#: ``MatMulInteger`` return int32 and round nothing.
ROUNDING = ("QuantizeLinear", "QGemm")


def rounding_points(op_counts: Mapping[str, int]) -> int:
    """``R``: how many nodes of the onnxruntime-optimised graph round onto an integer grid."""
    return sum(n for op, n in op_counts.items() if op.startswith("QLinear") or op in ROUNDING)


def max_diff_steps_bound(op_counts: Mapping[str, int]) -> int:
    """The largest |onnxruntime − PyTorch| INT8 logit difference, in output steps, that
    rounding alone explains: one step per rounding point (the premise and its measured
    margin are in this module's docstring)."""
    return rounding_points(op_counts)
