"""The paper's train/test splits (itsnamgyu/reasoning-teacher, src/data/generate_split.py).

Default: ``numpy.random.RandomState(seed).permutation(n)``, the first ``round(0.7 n)`` are train;
both lists sorted. numpy's legacy RandomState is stable across versions and platforms, which is
why these reproduce the released ``data/split/<key>__default.json`` files index for index.
"""

from __future__ import annotations

import numpy as np

TRAIN_RATIO = 0.7

# Predefined splits of the paper (sizes of the full datasets).
AQUA_TRAIN_SIZE = 97_467
AQUA_TEST_SIZE = 254
AQUA_TRAIN_SUBSAMPLE = 10_000
GSM8K_SIZES = (7_473, 1_319)
COMMONSENSE_QA_SIZES = (9_741, 1_221)


def paper_split(n: int, train_ratio: float = TRAIN_RATIO, seed: int = 0) -> dict[str, list[int]]:
    """{"train": [...], "test": [...]} over sample indices 0..n-1, the paper's random split."""
    if n < 0:
        raise ValueError(f"dataset size must be >= 0, got {n}")
    order = np.random.RandomState(seed).permutation(n)
    # Python's round (banker's rounding), as in the original code.
    n_train = round(n * train_ratio)
    return {"train": sorted(order[:n_train].tolist()), "test": sorted(order[n_train:].tolist())}


def ordered_split(n_train: int, n_test: int) -> dict[str, list[int]]:
    """A dataset shipped as train then test (GSM8K, CommonsenseQA with dev as test)."""
    return {"train": list(range(n_train)), "test": list(range(n_train, n_train + n_test))}


def aqua_split() -> dict[str, list[int]]:
    """AQuA: a seed-0 subsample of 10,000 of the 97,467 train questions; test follows them."""
    train = np.random.RandomState(0).permutation(AQUA_TRAIN_SIZE)[:AQUA_TRAIN_SUBSAMPLE]
    test = list(range(AQUA_TRAIN_SIZE, AQUA_TRAIN_SIZE + AQUA_TEST_SIZE))
    return {"train": sorted(train.tolist()), "test": test}


def split_from_column(records: list[dict], where: str = "records") -> dict[str, list[int]]:
    """Use a `split` value given on every record ("train" / "test")."""
    out: dict[str, list[int]] = {"train": [], "test": []}
    for rec in records:
        split = rec.get("split")
        if split not in out:
            raise ValueError(f"{where}: sample_index {rec['sample_index']}: split must be 'train' or 'test', got {split!r}")
        out[split].append(rec["sample_index"])
    return {k: sorted(v) for k, v in out.items()}
