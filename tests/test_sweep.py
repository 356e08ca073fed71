"""`ehap sweep --quick`: the accuracy–latency front on the embedded digits, end to end.

    dense ─▶ fine-tuned dense (teacher) ─▶ dense fp32 / INT8 ONNX
      └─▶ {removal, l1} × {0.8, 0.6} latency targets ─▶ fine-tune (distilled) ─▶ INT8 ONNX
    every ONNX file timed in one interleaved onnxruntime run ─▶ front.md / .json / .png
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from ehap_fx.passes.export import onnx_top1

from ehap_fx.isa import cpu_features
from ehap_fx.sweep import Arm, SweepOptions, _stage, arms, stderr_pt


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("sweep")
    proc = subprocess.run([sys.executable, "-m", "ehap_fx", "sweep", "--quick", "--quiet", "--out", "front"],
                          cwd=cwd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd / "front", proc


def test_quick_front_has_every_arm_timed_side_by_side(quick):
    out, proc = quick
    front = json.loads((out / "front.json").read_text())
    rows = front["rows"]
    assert [r["name"] for r in rows] == ["dense fp32", "dense INT8", "removal-t0.8", "l1-t0.8",
                                         "removal-t0.6", "l1-t0.6"]
    assert front["machine"]["isa"] == cpu_features().describe()
    t = front["timing_ms"]
    for r in rows:
        for b in ("1", "128"):  # speed-ups are over dense fp32 in the same timing run
            assert r[f"speedup_b{b}"] == pytest.approx(t["dense_fp32"][b] / r[f"ms_b{b}"], rel=1e-9)
    for r in rows[2:]:
        assert 0 < r["predicted_ratio"] <= 1 and r["macs_ratio"] < 1
        # the median of the per-round ratios to dense INT8, each round's files timed back to back
        rounds = front["timing_rounds_ms"]
        per_round = [c / d for c, d in zip(rounds[r["name"]]["128"], rounds["dense_int8"]["128"], strict=True)]
        assert r["measured_ratio"] == pytest.approx(statistics.median(per_round), rel=1e-9)
        assert r["measured_interval"][0] <= r["measured_ratio"] <= r["measured_interval"][1]
        assert t[r["name"]]["128"] == pytest.approx(statistics.median(rounds[r["name"]]["128"]), rel=1e-9)
        assert r["prediction_error"] == pytest.approx(r["predicted_ratio"] / r["measured_ratio"] - 1, rel=1e-9)
    assert (out / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "front.md").read_text()
    assert md.count("\n| ") == 1 + len(rows) and "removal-t0.6" in proc.stdout


def test_quick_front_top1_is_the_onnx_files_own(quick):
    from ehap_fx.data import DIGITS_NORM, load_digits

    out, _ = quick
    test = load_digits("test").loader(256, normalization=DIGITS_NORM)
    arm = json.loads((out / "arms" / "removal-t0.6" / "result.json").read_text())
    assert arm["accuracy"]["int8_onnx"] == onnx_top1(out / "arms" / "removal-t0.6" / "model_int8.onnx", test)
    assert arm["quantized_conv_fraction"] == 1.0 and arm["distill"] is True
    dense = json.loads((out / "dense" / "result.json").read_text())
    assert dense["top1_int8_onnx"] == onnx_top1(out / "dense" / "dense_int8.onnx", test)
    assert dense["test_images"] == 360


@pytest.mark.slow  # a second sweep over the cache (90 s on 2 busy cores)
def test_quick_front_resumes_without_recomputing(quick):
    out, _ = quick
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/*/result.json")}
    stamps |= {p: p.stat().st_mtime_ns for p in out.glob("dense/result.json")}
    proc = subprocess.run([sys.executable, "-m", "ehap_fx", "sweep", "--quick", "--quiet", "--out", "front",
                           "--bench-rounds", "1"], cwd=out.parent, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # every arm read back, none re-run
    assert not list(out.rglob(".*partial-*"))
    # --finished-only with a target not run yet: the finished arms tabulated, nothing computed
    proc = subprocess.run([sys.executable, "-m", "ehap_fx", "sweep", "--quick", "--quiet", "--out", "front",
                           "--bench-rounds", "1", "--finished-only", "--targets", "0.8", "0.6", "0.3"],
                          cwd=out.parent, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((out / "front.json").read_text())["rows"]
    assert len(rows) == 6 and not (out / "arms" / "removal-t0.3").exists()


def test_an_interrupted_stage_leaves_nothing(tmp_path):
    def boom(folder: Path) -> dict:
        (folder / "half.onnx").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _stage(tmp_path / "arm", boom)
    assert list(tmp_path.iterdir()) == []
    assert _stage(tmp_path / "arm", lambda f: {"a": 1})["a"] == 1
    assert _stage(tmp_path / "arm", lambda f: {"a": 2})["a"] == 1  # done: read, not re-run


def test_arms_put_the_first_distillation_setting_first():
    got = arms(SweepOptions(targets=(0.5, 0.3), scorers=("removal", "l1"), distill=(True, False)))
    assert got[:4] == [Arm(0.5, "removal", True), Arm(0.5, "l1", True), Arm(0.3, "removal", True),
                       Arm(0.3, "l1", True)]
    assert [a.name for a in got[4:]] == ["removal-t0.5-nodistill", "l1-t0.5-nodistill",
                                         "removal-t0.3-nodistill", "l1-t0.3-nodistill"]


@pytest.mark.parametrize("kw, match", [
    ({"targets": (1.5,)}, "targets="), ({"scorers": ("snip",)}, "scorers="), ({"distill": ()}, "distill="),
])
def test_options_name_the_bad_value(kw, match):
    with pytest.raises(ValueError, match=match):
        SweepOptions(**kw)


def test_stderr_is_binomial():
    assert stderr_pt(85.0, 10_000) == pytest.approx(0.357, abs=1e-3)
    assert stderr_pt(100.0, 50) == 0.0
