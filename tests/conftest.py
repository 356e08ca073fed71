"""Shared fixtures: where the real CIFAR-10 data and pretrained weights live, when present."""

from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CIFAR10_DIR = SHARED / "data"
WEIGHTS_DIR = SHARED / "weights"


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
