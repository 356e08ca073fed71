"""Hessian batches: exactly the requested number of samples, drawn (seeded) from any data."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ehap_fx.errors import HessianError

Batch = tuple[torch.Tensor, torch.Tensor]


def draw_batches(data, batch_size: int, n_batches: int, seed: int) -> list[Batch]:
    """``n_batches`` batches of exactly ``batch_size`` samples, drawn without replacement.

    ``data`` is an ``(x, y)`` tensor pair, a map-style dataset of ``(x, y)`` samples, a
    ``DataLoader`` (its dataset is sampled), or any iterable of ``(x, y)`` batches, a list of
    batches included (pooled until enough samples are there, then sampled). The draw depends
    only on ``seed``.
    """
    need = batch_size * n_batches
    gen = torch.Generator().manual_seed(seed)
    dataset = getattr(data, "dataset", None)
    # a map-style dataset is sampled; an IterableDataset also has ``__getitem__`` (Dataset's,
    # which raises) and yields samples, not batches: its loader's batches are pooled
    loader = isinstance(data, torch.utils.data.DataLoader)
    if loader and not isinstance(dataset, torch.utils.data.IterableDataset):
        data = dataset
    if isinstance(data, (tuple, list)) and len(data) == 2 and torch.is_tensor(data[0]):
        x, y = data
        idx = _choose(len(x), need, gen)
        x, y = x[idx], y[idx]
    elif isinstance(data, (tuple, list)) and data and _is_batch(data[0]):  # a list of batches
        x, y = _pool(data, need)
        idx = _choose(len(x), need, gen)
        x, y = x[idx], y[idx]
    elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        idx = _choose(len(data), need, gen).tolist()
        samples = [data[i] for i in idx]
        x = torch.stack([torch.as_tensor(s[0]) for s in samples])
        y = torch.as_tensor([int(s[1]) for s in samples])
    else:
        x, y = _pool(data, need)
        idx = _choose(len(x), need, gen)
        x, y = x[idx], y[idx]
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, need, batch_size)]


def _is_batch(item) -> bool:
    """An ``(x, y)`` batch, told from a sample by its labels: a 1-D tensor, not a scalar."""
    return (isinstance(item, (tuple, list)) and len(item) == 2 and torch.is_tensor(item[1])
            and item[1].dim() == 1)


def _choose(available: int, need: int, gen: torch.Generator) -> torch.Tensor:
    if available < need:
        raise HessianError(f"the data has {available} samples but batch_size * n_batches = "
                           f"{need}: lower batch_size or n_batches, or pass more data")
    return torch.randperm(available, generator=gen)[:need]


def _pool(batches: Iterable, need: int) -> Batch:
    xs, ys, have = [], [], 0
    for x, y in batches:
        xs.append(torch.as_tensor(x))
        ys.append(torch.as_tensor(y))
        have += len(xs[-1])
        if have >= need:
            break
    if not xs:
        raise HessianError("the data yielded no batches: pass (x, y) tensors or a DataLoader")
    return torch.cat(xs), torch.cat(ys)
