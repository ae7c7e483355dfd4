"""The validation split: training items held out (seeded) for choosing a sub-model, never trained on.

Every data source calls :func:`hold_out` once, on its whole training set (images, rows, documents or
examples) and before ``train_subset`` cuts it, so the validation items do not depend on
``train_subset`` and never reach training, calibration or the test set:

- ``data.val_fraction`` (default 0.1 in ``conf/data``; 0 turns it off): the share of the training
  items held out, ``round(fraction x n)``, at least 1;
- ``data.val_seed`` (default 0): the seed of the permutation that picks them (a ``torch.Generator`` of
  its own, so the split is the same in every process, on resume and with any run seed);
- ``data.val_subset`` (``eval.val_subset`` at eval time): score only the first N validation items.

A run saved before the split existed has no ``val_fraction`` in its config and keeps all its training
items (:func:`fraction` is 0 then): eval reports no validation numbers for it and export says so.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, Subset

from sortedcli.errors import UsageError


def fraction(cfg) -> float:
    """``data.val_fraction``, checked: a number in [0, 1); absent (an older run's config) is 0."""
    value = cfg.get("val_fraction")
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise UsageError(f"data.val_fraction must be a fraction in [0, 1) of the training items (0: no "
                         f"validation split), got {value!r}")
    return float(value)


def hold_out(n: int, cfg) -> tuple[list[int], list[int]]:
    """``(train, val)`` indices into ``n`` training items: ``val`` the seeded held-out ones (sorted),
    ``train`` the others in their original order (so ``train_subset`` still takes the first ones)."""
    share = fraction(cfg)
    if share == 0:
        return list(range(n)), []
    seed = cfg.get("val_seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UsageError(f"data.val_seed must be an integer, got {seed!r}")
    count = max(1, round(share * n))
    if count >= n:
        raise UsageError(f"data.val_fraction={share:g} of {n} training items leaves none to train on: "
                         "lower data.val_fraction (0 turns the validation split off)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val = sorted(order[:count].tolist())
    held = set(val)
    return [i for i in range(n) if i not in held], val


def take(items, indices: list[int]):
    """``items`` at ``indices``: a list, a tensor (first axis) or a Dataset (a Subset)."""
    if isinstance(items, torch.Tensor):
        return items[torch.tensor(indices, dtype=torch.long)]
    if isinstance(items, Dataset):
        return Subset(items, indices)
    return [items[i] for i in indices]


def cap(val: Dataset | None, cfg) -> Dataset | None:
    """``data.val_subset``: the first N validation items only (null: all of them)."""
    n = cfg.get("val_subset")
    if val is None or n is None:
        return val
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UsageError(f"data.val_subset must be a positive integer or null, got {n!r}")
    return val if n >= len(val) else Subset(val, range(n))
