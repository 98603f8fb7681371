"""Class-stratified subsets for files ordered by class (ImageNet folders, sorted HF datasets).

A first-N subset of a class-sorted folder holds the first classes only; these draws take every
class in proportion to its size, with a fixed seed so every rank and every run draws the same
samples. Datasets whose order is already shuffled (IDX files, CIFAR batches) keep first-N, as
RobustBench takes the first N CIFAR test points.
"""
from __future__ import annotations

import numpy as np

SUBSET_SEED = 0  # fixed: the same subset for every training seed, so runs compare on equal data


def grouped_by_class(labels) -> bool:
    """True when each class occupies one contiguous run (sorted or grouped files)."""
    labels = np.asarray(labels)
    if len(labels) < 2:
        return False
    runs = 1 + int(np.count_nonzero(labels[1:] != labels[:-1]))
    return len(np.unique(labels)) == runs > 1


def class_quotas(counts: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """How many of ``n`` each class gets: its share rounded down, the rest to the largest
    remainders (ties broken at random)."""
    exact = n * counts / counts.sum()
    quota = np.floor(exact).astype(np.int64)
    order = np.lexsort((rng.random(len(counts)), -(exact - quota)))
    quota[order[:n - int(quota.sum())]] += 1
    return quota


def stratified_indices(labels, n: int, seed: int = SUBSET_SEED) -> np.ndarray:
    """``n`` indices into ``labels`` spanning the classes in proportion, in ascending order.

    >>> stratified_indices([0, 0, 0, 0, 1, 1, 1, 1], 4).tolist()  # two of each class
    [0, 3, 4, 7]
    """
    labels = np.asarray(labels)
    if not 0 <= n <= len(labels):
        raise ValueError(f"cannot draw {n} of {len(labels)} samples")
    rng = np.random.default_rng(seed)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    groups = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])
    quota = class_quotas(counts, n, rng)
    picks = [rng.choice(g, q, replace=False) for g, q in zip(groups, quota) if q]
    return np.sort(np.concatenate(picks)) if picks else np.zeros(0, dtype=np.int64)
