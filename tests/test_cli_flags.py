"""Each ``ehap compress`` flag has its effect in report.json: tiny runs (ResNet-20, L1, 64 synthetic
images), one per flag, each checked against what the flag promises (split from test_cli.py)."""

from __future__ import annotations

import json

import pytest
from test_cli import TINY, ehap  # tests/ is on sys.path (pytest rootdir import)

# ---------------------------------------------------------------------------------------------
# Each flag has its effect in report.json (tiny runs: ResNet-20, L1, 64 synthetic images)
# ---------------------------------------------------------------------------------------------


def _kept_sizes(report) -> list[tuple[int, int]]:
    """(kept, size) of the blocks' inner groups (a block's conv1 output): never emptiable, so the
    floors apply (an emptiable group, option A's zero-padded stream, may keep any width)."""
    return [(g["kept"], g["size"]) for g in report["groups"]
            if any(m.endswith(".conv1:out") for m in g["members"])]


def _no_quantize(r, out):
    assert r["quantize"] is None and r["export"] is None and r["latency"] is None
    assert not (out / "model_int8.onnx").exists()
    assert set(r["accuracy"]) == {"dense", "dense_finetuned", "pruned", "compensated", "finetuned"}


def _backend_pt2e(r, out):
    assert r["quantize"]["backend"] == "pt2e" and r["export"]["quantized_conv_fraction"] == 1.0


def _int8_target_avx2(r, out):
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    assert r["quantize"]["scheme"]["target"] == "x86-avx2" and r["quantize"]["scheme"]["weight_bits"] == 7
    model = onnx.load(str(out / "model_int8.onnx"))
    assert {p.key: p.value for p in model.metadata_props}["ehap.weight_bits"] == "7"
    tensors = [*model.graph.initializer, *(n.attribute[0].t for n in model.graph.node if n.op_type == "Constant")]
    weights = [numpy_helper.to_array(t) for t in tensors if t.data_type == onnx.TensorProto.INT8]
    weights = [w for w in weights if w.ndim >= 2]
    # every conv left and the fc, and a depthwise 1x1 conv per dropped block's constant add
    assert len(weights) >= len(r["channels_after"])
    assert all(-64 <= w.min() and w.max() <= 63 for w in weights)


def _min_channels(r, out):
    # --target-macs 0.3 asks for more than the floor allows in some groups; none goes below 12
    # (but an emptiable group, option A's zero-padded shortcut channels, may go to 0: its values
    # carry other channels, ehap_fx.passes.group.emptiable_groups)
    assert r["target"]["fraction"] == 0.3
    assert _kept_sizes(r) and all(kept >= min(12, size) or kept == 0 for kept, size in _kept_sizes(r))
    assert any(kept == 12 for kept, _ in _kept_sizes(r))


def _max_prune(r, out):
    # at most a quarter of each group may go (round_to 1): kept >= ceil(0.75 * size)
    assert r["target"]["max_prune"] == 0.25
    assert all(kept >= -(-3 * size // 4) or kept == 0 for kept, size in _kept_sizes(r))  # 0: emptiable
    assert any(kept == -(-3 * size // 4) for kept, size in _kept_sizes(r))


def _teacher_given(r, out):
    assert r["finetune"]["distill"]["teacher"] == "given"
    assert "dense_finetuned" not in r["accuracy"] and "teacher_finetune" not in r["seconds"]


def _prune_from_given(r, out):
    # the teacher is still fine-tuned and distilled from; only the model pruned changes
    assert r["finetune"]["distill"]["start"] == "given" and r["target"]["pruned_from"] == "dense"
    assert "dense_finetuned" in r["accuracy"] and "teacher_finetune" in r["seconds"]


def _target_latency(r, out):
    assert r["target"]["kind"] == "latency" and r["target"]["fraction"] == 0.7
    assert r["target"]["latency_ratio"] <= 0.7
    assert r["target"]["latency_after_s"] == pytest.approx(r["target"]["latency_ratio"] * r["target"]["latency_before_s"])


FAST = ["--bench-rounds", "0"]
FLAG_CASES = {
    "no-quantize": (["--no-quantize"], _no_quantize),
    "backend": (["--backend", "pt2e", *FAST], _backend_pt2e),
    "int8-target": (["--int8-target", "x86-avx2", *FAST], _int8_target_avx2),
    "min-channels": (["--no-quantize", "--target-macs", "0.3", "--round-to", "1", "--granularity", "channel",
                      "--min-channels", "12"], _min_channels),
    "max-prune": (["--no-quantize", "--target-macs", "0.8", "--round-to", "1", "--granularity", "channel",
                   "--max-prune", "0.25"], _max_prune),
    "teacher": (["--no-quantize", "--teacher", "given"], _teacher_given),
    "prune-from": (["--no-quantize", "--prune-from", "given"], _prune_from_given),
    "target-latency": (["--no-quantize", "--target-latency", "0.7", "--latency-batch", "8",
                        "--latency-precision", "fp32", "--latency-loop-rounds", "0"], _target_latency),
}


@pytest.mark.parametrize("case", list(FLAG_CASES))
def test_each_flag_has_its_effect(case, tmp_path):
    flags, check = FLAG_CASES[case]
    out = tmp_path / "out"
    proc = ehap("compress", *TINY, *flags, "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check(json.loads((out / "report.json").read_text()), out)
