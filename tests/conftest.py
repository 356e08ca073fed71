"""Shared fixtures: where the real CIFAR-10 data and pretrained weights live, when present; and
caches in a temporary folder, so that a test run writes nothing under the user's ``~/.cache``."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CIFAR10_DIR = SHARED / "data"
WEIGHTS_DIR = SHARED / "weights"


# Caches a test run would otherwise write under ~: the latency table (ehap_fx.latency, under
# XDG_CACHE_HOME), torch.hub's checkpoints (TORCH_HOME) and matplotlib's font cache
# (MPLCONFIGDIR). Set for the whole session, so the CLI's subprocesses inherit them.
CACHE_VARIABLES = ("XDG_CACHE_HOME", "TORCH_HOME", "MPLCONFIGDIR")
_saved_environment: dict[str, str | None] = {}


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # one of `-n 2`'s workers: one intra-op thread each, or the two workers' spinning torch
        # threads fight over the 2 cores (tests that want more threads set them)
        torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="ehap-test-cache-"))
    config._ehap_cache_root = root
    for name in CACHE_VARIABLES:
        _saved_environment[name] = os.environ.get(name)
        os.environ[name] = str(root / name.lower())


def pytest_unconfigure(config):
    for name, value in _saved_environment.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    root = getattr(config, "_ehap_cache_root", None)
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: tiny models run faster, and far steadier on a shared
    CPU (two spinning threads on a loaded 2-core box run many times slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cifar10_root() -> Path:
    """Directory holding ``cifar-10-batches-py``; skips the test when absent."""
    if not (CIFAR10_DIR / "cifar-10-batches-py" / "test_batch").exists():
        pytest.skip(f"real CIFAR-10 not found under {CIFAR10_DIR}")
    return CIFAR10_DIR


@pytest.fixture
def weights_dir() -> Path:
    """Directory of the pretrained CIFAR checkpoints; skips the test when absent."""
    if not WEIGHTS_DIR.is_dir():
        pytest.skip(f"pretrained weights not found under {WEIGHTS_DIR}")
    return WEIGHTS_DIR
