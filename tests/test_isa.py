"""The instruction-set facts behind the INT8 scheme and the half-precision warning.

The one expectation that really depends on the CPU, the int16 saturation of u8×s8 pair sums
on x86 without VNNI, is tested on a one-weight QLinearConv whose exact result is known: the
test reads the CPU and says in its message which result that CPU must give.

    x (u8: 255, 255) ──QLinearConv (w: s8 [w, w], y_scale 1000)──▶ y = round(255·2w / 1000)
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from ehap_fx.passes.quantize import QuantizeOptions, scheme

from ehap_fx import isa
from ehap_fx.isa import CpuFeatures, EmulatedPrecisionWarning, cpu_features, emulated_precision, int8_target
from ehap_fx.scoring import setup
from ehap_fx.scoring.setup import resolve_dtype

AVX2 = CpuFeatures("x86_64", avx2=True)
VNNI = CpuFeatures("x86_64", avx2=True, avx512=True, vnni=True, bf16=True)


def _qlinearconv(weight: int) -> int:
    """onnxruntime's QLinearConv of x = [255, 255] with w = [weight, weight], all scales 1
    except y_scale = 1000, zero points 0: returns the uint8 output."""
    onnx = pytest.importorskip("onnx")
    from ehap_fx.passes.export import session
    from onnx import TensorProto, helper

    inits = [
        helper.make_tensor("xs", TensorProto.FLOAT, [], [1.0]),
        helper.make_tensor("xz", TensorProto.UINT8, [], [0]),
        helper.make_tensor("w", TensorProto.INT8, [1, 2, 1, 1], [weight, weight]),
        helper.make_tensor("ws", TensorProto.FLOAT, [1], [1.0]),
        helper.make_tensor("wz", TensorProto.INT8, [1], [0]),
        helper.make_tensor("ys", TensorProto.FLOAT, [], [1000.0]),
        helper.make_tensor("yz", TensorProto.UINT8, [], [0]),
    ]
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"])
    graph = helper.make_graph(
        [node], "sat", [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [1, 1, 4, 4])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sat.onnx"
        onnx.save(model, str(path))
        out = session(path).run(None, {"x": np.full((1, 2, 4, 4), 255, np.uint8)})[0]
    assert len(np.unique(out)) == 1
    return int(out.flat[0])


def test_u8s8_pair_sums_saturate_only_without_vnni():
    f = cpu_features()
    int32_accumulation = f.vnni or f.avx_vnni or f.arch == "arm64"
    exact_8bit, saturated_8bit = round(255 * 127 * 2 / 1000), round(32767 / 1000)  # 65, 33
    got = _qlinearconv(127)
    if int32_accumulation:
        assert got == exact_8bit, f"{f.describe()} accumulates u8*s8 in int32: expected {exact_8bit}, got {got}"
    else:
        assert got == saturated_8bit, (
            f"{f.describe()} has no VNNI: 255*127 + 255*127 = 64770 saturates to 32767 in int16, "
            f"expected {saturated_8bit}, got {got}"
        )
    # 7-bit weights (the x86-avx2 scheme) are exact everywhere: 255*63*2 = 32130 <= 32767
    assert _qlinearconv(63) == round(255 * 63 * 2 / 1000), f.describe()


def test_auto_target_follows_the_cpu():
    assert int8_target("auto", AVX2) == "x86-avx2"
    assert int8_target("auto", VNNI) == "x86-vnni"
    assert int8_target("auto", CpuFeatures("arm64")) == "arm64"
    f = cpu_features()  # this CPU, by the rule: ARM -> arm64; x86 with AVX512-VNNI -> vnni; else avx2
    assert int8_target("auto") == ("arm64" if f.arch == "arm64" else "x86-vnni" if f.vnni else "x86-avx2")
    with pytest.raises(ValueError, match="target='x86'"):
        int8_target("x86")
    with pytest.raises(ValueError, match="target='riscv'"):
        QuantizeOptions(target="riscv")


def test_scheme_ranges_never_saturate_int16_pairs():
    for target in isa.INT8_TARGETS:
        lo, hi = scheme(target).weight_range
        if target == "x86-avx2":
            assert 255 * max(-lo, hi) * 2 <= 2**15 - 1
        assert lo == -hi - 1
    auto = scheme("auto")
    assert auto.target == int8_target("auto") and auto.reason.startswith(f"auto on {cpu_features().describe()}")


@pytest.mark.parametrize(("target", "bits"), [("x86-vnni", 8), ("x86-avx2", 7), ("arm64", 8)])
def test_a_schemes_weight_bits_count_the_integers_of_its_range(target, bits):
    """256 weights (-128..127) are 8 bits, 128 (-64..63) are 7; the record says the same."""
    chosen = scheme(target)
    lo, hi = chosen.weight_range
    assert hi - lo + 1 == 2**bits and chosen.weight_bits == bits
    assert chosen.as_dict() == {"target": target, "weight_bits": bits, "weight_range": [lo, hi],
                                "activation_range": [0, 255], "reason": chosen.reason}
    assert chosen.reason.startswith("given: ")


def test_describe_names_the_instruction_set():
    assert AVX2.describe() == "x86_64 AVX2"
    assert VNNI.describe() == "x86_64 AVX-512 VNNI BF16"
    assert CpuFeatures("arm64").describe() == "arm64"


def test_emulated_half_precision_warns_with_its_cost(monkeypatch):
    monkeypatch.setattr(isa, "cpu_features", lambda: AVX2)
    message = emulated_precision("bf16")
    assert message is not None and "x86_64 AVX2" in message and "would choose fp32" in message
    assert "x slower than fp32" in message
    with pytest.warns(EmulatedPrecisionWarning, match="dtype='bf16' is emulated"):
        assert resolve_dtype("bf16", torch.device("cpu")) == "bf16"
    assert emulated_precision("fp32") is None
    assert emulated_precision("bf16", "cuda") is None
    monkeypatch.setattr(isa, "cpu_features", lambda: VNNI)
    monkeypatch.setattr(setup, "cpu_features", lambda: VNNI)
    assert emulated_precision("bf16") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_dtype("bf16", torch.device("cpu")) == "bf16"
        assert resolve_dtype("auto", torch.device("cpu")) == "bf16"
