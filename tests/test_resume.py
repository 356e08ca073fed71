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
from ehap_fx.cli.outputs import partial_folder
from ehap_fx.checkpoint import Checkpoints
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


@pytest.mark.parametrize("step", ["teacher", "prune", "finetune"])
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
