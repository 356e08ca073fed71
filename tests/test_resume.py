"""``ehap compress --resume``: a killed run continues from the steps it saved, and ends with the
outputs of a run that was never stopped.

    ehap compress ... --out OUT            writes .OUT.partial/checkpoints/{teacher,prune,repair,finetune}.pt
      SIGKILL after one of them            .OUT.partial stays as it was
    ehap compress ... --out OUT --resume   reads the saved steps, restores the random streams
      -> OUT/pruned_state_dict.pt and report.json's top-1s equal the uninterrupted run's
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ehap_fx import cli
from ehap_fx.checkpoint import Checkpoints
from ehap_fx.cli.outputs import partial_folder
from ehap_fx.errors import ResumeError
from tests.test_cli import assert_user_error, ehap

# the embedded digits default, short: 1 epoch of the digits model, 5 fine-tune steps, no timing
QUICK = ["--train-epochs", "1", "--finetune-steps", "5", "--bench-rounds", "0", "--quiet"]


def outputs(out: Path) -> tuple[dict, dict]:
    """(the pruned weights, report.json's top-1s) of a finished run."""
    state = torch.load(out / "pruned_state_dict.pt", weights_only=True)["state_dict"]
    return state, json.loads((out / "report.json").read_text())["accuracy"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[dict, dict]:
    folder = tmp_path_factory.mktemp("whole")
    proc = ehap("compress", *QUICK, "--out", str(folder / "out"), cwd=folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return outputs(folder / "out")


def killed_after(step: str, out: Path, *flags: str) -> Path:
    """Start ``ehap compress``, SIGKILL it once ``step``'s checkpoint is written; the partial folder."""
    partial = partial_folder(out)
    proc = subprocess.Popen([sys.executable, "-m", "ehap_fx", "compress", *QUICK, *flags, "--out", str(out)],
                            cwd=out.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (partial / "checkpoints" / f"{step}.pt").exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert not out.exists() and partial.is_dir()
    return partial


# each a whole run and a resumed one (60-80 s on 2 busy cores): the default run keeps "prune" (the
# pruned graph rebuilt from its saved plans); -m slow runs the others
@pytest.mark.parametrize("step", [pytest.param("teacher", marks=pytest.mark.slow), "prune",
                                  pytest.param("finetune", marks=pytest.mark.slow)])
def test_a_killed_run_resumes_to_the_same_outputs(step, tmp_path, uninterrupted):
    out = tmp_path / "out"
    killed_after(step, out)
    proc = ehap("compress", *QUICK, "--out", str(out), "--resume", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state, accuracy = outputs(out)
    whole_state, whole_accuracy = uninterrupted
    assert accuracy == whole_accuracy
    assert state.keys() == whole_state.keys()
    for name, tensor in whole_state.items():
        assert torch.equal(state[name], tensor), name
    assert not partial_folder(out).exists() and not (out / "checkpoints").exists()


def test_a_partial_folder_of_other_flags_is_refused(tmp_path):
    out = tmp_path / "out"
    partial = killed_after("teacher", out)
    proc = ehap("compress", *QUICK, "--lr", "0.02", "--out", str(out), "--resume", cwd=tmp_path)
    line = assert_user_error(proc, "another run", "--lr: 0.01 then, 0.02 now", "without --resume")
    assert str(partial) in line
    assert (partial / "checkpoints" / "teacher.pt").is_file()  # refused, not deleted


def test_resume_without_a_partial_folder_is_refused(tmp_path):
    proc = ehap("compress", *QUICK, "--out", str(tmp_path / "out"), "--resume", cwd=tmp_path)
    assert_user_error(proc, "--resume: no interrupted run", "drop --resume", out=tmp_path / "out")


def test_checkpoints_of_another_source_are_refused(tmp_path):
    ck = Checkpoints(tmp_path / "ck")
    ck.check("compress", {"ehap_fx": "ehap-fx 0.1.0 (source aaaa)", "options.lr": 0.01})
    ck.check("compress", {"ehap_fx": "ehap-fx 0.1.0 (source aaaa)", "options.lr": 0.01})  # the same: fine
    with pytest.raises(ResumeError, match=r"ehap_fx: 'ehap-fx 0.1.0 \(source aaaa\)' then, "
                                          r"'ehap-fx 0.1.0 \(source bbbb\)' now"):
        ck.check("compress", {"ehap_fx": "ehap-fx 0.1.0 (source bbbb)", "options.lr": 0.01})


def test_an_interrupted_run_keeps_its_saved_steps(tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with cli.staging(out) as tmp:
            Checkpoints(tmp / "checkpoints").save("teacher", {"state_dict": {}})
            raise KeyboardInterrupt
    assert (tmp / "checkpoints" / "teacher.pt").is_file() and not (tmp / "owner.pid").exists()
    assert "--resume" in capsys.readouterr().err
    with cli.staging(out, resume=True) as again:  # --resume takes it back
        assert again == tmp and (again / "checkpoints" / "teacher.pt").is_file()
    assert out.is_dir() and not (out / "checkpoints").exists() and not tmp.exists()


def test_a_live_runs_partial_folder_is_not_taken(tmp_path):
    out = tmp_path / "out"
    partial = partial_folder(out)
    partial.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (partial / "owner.pid").write_text(str(sleeper.pid))
        with pytest.raises(cli.UsageError, match=f"pid {sleeper.pid}"):
            with cli.staging(out):
                pass
    finally:
        sleeper.kill()
        sleeper.wait()
    with cli.staging(out):  # its owner is gone: a new run takes the folder
        pass
    assert out.is_dir()


# ---------------------------------------------------------------------------------------------
# Mid-fine-tune checkpoints: every N steps, resumed bit-exact
# ---------------------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised right after a loop checkpoint is written: the run "dies" there."""


@pytest.mark.parametrize("stop", [7, 23, 28])  # mid-epoch, the epoch's last batch (23 of 23), the next epoch
def test_a_finetune_resumes_bit_exact_from_its_loop_checkpoint(stop, tmp_path, monkeypatch):
    from torch import nn

    from ehap_fx.data import load_digits
    from ehap_fx.train import FinetuneOptions, finetune

    train = load_digits("train")  # 1,437 images: 23 batches of 64

    def run(checkpoints):  # dropout and augmentation: the global and the loader's random streams
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.3), nn.Flatten(),
                            nn.Linear(8 * 14 * 14, 10))
        result = finetune(net, train.loader(64, shuffle=True, augment=True, seed=0),
                          FinetuneOptions(epochs=3, max_steps=50, progress=False), checkpoints=checkpoints)
        return net, result

    (whole, whole_result), (resumed, result) = run(None), stopped_and_resumed(run, tmp_path, stop, monkeypatch)
    assert result.losses == whole_result.losses and result.epochs == whole_result.epochs
    assert_same_state(whole, resumed)


def stopped_and_resumed(run, folder: Path, every: int, monkeypatch):
    """``run(checkpoints)`` "killed" right after its first loop checkpoint, then run again on
    the same folder: what the resumed run returns."""
    save = Checkpoints.save

    def save_then_die(self, name, value):
        save(self, name, value)
        raise _Stop

    monkeypatch.setattr(Checkpoints, "save", save_then_die)
    with pytest.raises(_Stop):
        run(Checkpoints(folder, every=every))
    monkeypatch.setattr(Checkpoints, "save", save)
    return run(Checkpoints(folder, every=every))


def assert_same_state(whole: torch.nn.Module, resumed: torch.nn.Module) -> None:
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_a_run_killed_mid_finetune_resumes_to_the_same_outputs(tmp_path, uninterrupted):
    out = tmp_path / "out"
    killed_after("finetune.loop", out, "--checkpoint-every", "2")  # after its step 2 or 4 of 5
    proc = ehap("compress", *QUICK, "--out", str(out), "--resume", "--checkpoint-every", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state, accuracy = outputs(out)
    assert accuracy == uninterrupted[1]
    for name, tensor in uninterrupted[0].items():
        assert torch.equal(state[name], tensor), name


@pytest.mark.parametrize("backend,stop", [  # 6: after the BN freeze (step 4); 14: the next epoch, after both
    ("fx", 14), *(pytest.param(b, s, marks=pytest.mark.slow) for b, s in [("fx", 6), ("pt2e", 6), ("pt2e", 14)])])
def test_a_qat_loop_resumes_bit_exact_with_its_freezes(backend, stop, tmp_path, monkeypatch):
    """The QAT loop's checkpoint holds the quantizers' state; the BN freeze (a module attribute
    for torch.ao FX, graph meta for PT2E) is applied again on resume."""
    from dataclasses import replace

    from ehap_fx.passes.quantize import QAT_FINETUNE, QuantizeOptions, calibrate_ranges, prepare
    from torch import nn

    from ehap_fx import _meta
    from ehap_fx.data import load_digits
    from ehap_fx.qat import qat_finetune

    if backend == "pt2e":
        pytest.importorskip("torchao")
    train = load_digits("train")  # 12 batches of 128: 2 epochs, 16 steps
    options = QuantizeOptions(mode="qat", backend=backend, freeze_bn_after=0.3, freeze_observers_after=0.6,
                              finetune=replace(QAT_FINETUNE, epochs=2, max_steps=16, lr=0.05))
    x0 = next(iter(train.loader(128)))[0]

    def run(checkpoints):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8),
                            nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
        prepared = prepare(net, x0[:2], options)
        calibrate_ranges(prepared, list(train.loader(128))[:2], 2)
        result = qat_finetune(prepared, train.loader(128, shuffle=True, augment=True, seed=0), options,
                              checkpoints=checkpoints)
        frozen = ([m.freeze_bn for m in prepared.modules() if hasattr(m, "freeze_bn")] if backend == "fx"
                  else prepared.meta.get(_meta.BN_FROZEN))
        return prepared, result, frozen

    whole, whole_result, whole_frozen = run(None)
    resumed, result, frozen = stopped_and_resumed(run, tmp_path, stop, monkeypatch)
    assert (tmp_path / "qat.loop.pt").is_file()
    assert result.losses == whole_result.losses and frozen == whole_frozen and frozen not in ([], None)
    assert_same_state(whole, resumed)
