"""Checkpoints of compress(): each expensive step's result on disk, so that a killed run resumes.

    compress(..., checkpoints=Checkpoints("ckpt/"))       # a first run, killed during the fine-tune
    compress(..., checkpoints=Checkpoints("ckpt/"))       # the same call: the finished steps are read

A step that finished (the teacher, the ranking and plans, the repair, the fine-tune) is saved as
``NAME.pt`` with the state of every random stream the rest of the run draws from (torch's,
Python's, NumPy's and the loaders' own generators, :func:`rng_state`); a resumed run reads it
instead of recomputing it and restores those streams, so its outputs equal an uninterrupted
run's. A fine-tune also saves itself every ``every`` steps (model, optimizer, schedule, losses,
the data position, the random streams: ``ehap_fx.train``). Files are written to a temporary
name and renamed (``os.replace``), so a kill leaves the previous checkpoint whole.

``manifest.json`` says what the checkpoints belong to (the options, the model's weights, the
ehap-fx source); a run with anything else refuses the folder with :class:`ResumeError` naming
what differs. Under torchrun rank 0 alone writes and reads; every rank gets rank 0's values.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ehap_fx import process_group
from ehap_fx.errors import ResumeError

log = logging.getLogger("ehap_fx")

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Checkpoints:
    """Where a run keeps its checkpoints (``folder``) and how often a fine-tune saves itself
    (``every`` optimizer steps; None: at the end of each step of the recipe only)."""

    folder: Path
    every: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "folder", Path(self.folder))
        if self.every is not None and (isinstance(self.every, bool) or self.every < 1):
            raise ValueError(f"every={self.every!r} must be >= 1 optimizer steps or None")

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.pt"

    def save(self, name: str, value: Any) -> None:
        """``value`` as ``NAME.pt``, atomically (rank 0 writes; other ranks do nothing)."""
        if process_group.is_main():
            _atomic(self.path(name), lambda tmp: torch.save(value, tmp))

    def load(self, name: str) -> Any | None:
        """``NAME.pt`` as saved (None when absent): rank 0 reads it, every rank gets rank 0's."""
        value = None
        if process_group.is_main() and self.path(name).is_file():
            # our own file in the run's folder: it holds dataclasses (plans, rankings), not only tensors
            value = torch.load(self.path(name), weights_only=False, map_location="cpu")
        return process_group.broadcast_object(value)

    def check(self, section: str, values: dict) -> None:
        """Record ``values`` under ``section`` of the manifest, or, when a run already recorded
        that section, refuse the folder unless they are equal (naming what differs)."""
        problem = None
        if process_group.is_main():
            path = self.folder / MANIFEST
            manifest = json.loads(path.read_text()) if path.is_file() else {}
            values = json.loads(json.dumps(values, default=str))  # as it reads back
            if section in manifest:
                problem = _differences(manifest[section], values)
            else:
                manifest[section] = values
                _atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1)))
        problem = process_group.broadcast_object(problem)
        if problem:
            raise ResumeError(f"the checkpoints in {str(self.folder)!r} belong to another run: {problem}; "
                              "start over without them (ehap compress: without --resume)")


def _differences(saved: dict, now: dict) -> str | None:
    diff = [f"{k}: {_short(saved.get(k))} then, {_short(now.get(k))} now"
            for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    return "; ".join(diff[:4]) + (f" (and {len(diff) - 4} more)" if len(diff) > 4 else "") if diff else None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _atomic(path: Path, write) -> None:
    """``write(tmp)`` then ``os.replace(tmp, path)``: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# What the checkpoints belong to
# ---------------------------------------------------------------------------------------------


def source_hash() -> str:
    """ehap-fx's version and a hash of its source (the package and its passes): a checkpoint of
    other code is refused even when the version number did not change."""
    h = hashlib.sha256()
    for package in ("ehap_fx", "ehap_fx.passes"):
        root = Path(importlib.util.find_spec(package).origin).parent
        for f in sorted(root.rglob("*.py")):
            h.update(f"{package}/{f.relative_to(root).as_posix()}".encode())
            h.update(f.read_bytes())
    try:
        version = importlib.metadata.version("ehap-fx")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return f"ehap-fx {version} (source {h.hexdigest()[:12]}), torch {torch.__version__}"


def weights_hash(model: torch.nn.Module) -> str:
    """A hash of the model's parameters and buffers (names, shapes, values)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        if isinstance(t, torch.Tensor):
            t = t.detach().cpu().contiguous()
            h.update(str((tuple(t.shape), t.dtype)).encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Random streams
# ---------------------------------------------------------------------------------------------


def rng_state(loaders: Iterable = ()) -> dict:
    """The state of every random stream a run draws from: torch's (and CUDA's), Python's,
    NumPy's, and each loader's own (those with ``state_dict()``, e.g. ``CifarLoader``)."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
            "loaders": [_loader_state(d) for d in loaders]}


def set_rng_state(state: dict, loaders: Iterable = ()) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for loader, saved in zip(loaders, state["loaders"], strict=True):
        if saved is not None:
            loader.load_state_dict(saved)


def _loader_state(loader) -> dict | None:
    fn = getattr(loader, "state_dict", None)
    return fn() if callable(fn) and not isinstance(loader, torch.nn.Module) else None


def loaders_of(*candidates) -> list:
    """The distinct loaders among ``candidates`` (None and repeats dropped), in order."""
    out: list = []
    for c in candidates:
        if c is not None and all(c is not o for o in out):
            out.append(c)
    return out
