"""Validation splits shared by the DataModules."""
from __future__ import annotations

import math
from collections import Counter
from typing import List, Sequence, Tuple

from sklearn.model_selection import train_test_split


def stratified_holdout(samples: Sequence, labels: Sequence[int], class_names: Sequence[str], fraction: float,
                       seed: int, where: str) -> Tuple[List, List, List[int], List[int]]:
    """Hold out ``fraction`` of ``samples`` (at least one per class), stratified, with a fixed seed.

    Returns ``(kept, held_out, kept_indices, held_out_indices)``; ``where`` names the source in errors.
    """
    counts = Counter(labels)
    too_few = [class_names[c] for c in range(len(class_names)) if 0 < counts[c] < 2]
    if too_few:
        raise ValueError(f"cannot hold out a stratified validation split from {where}: classes {too_few[:10]} "
                         f"have fewer than 2 images; use a separate validation list or more images")
    present = sum(1 for c in counts if counts[c] > 0)
    n_val = max(present, math.ceil(fraction * len(samples)))
    kept_idx, held_idx = train_test_split(list(range(len(samples))), test_size=n_val, stratify=list(labels),
                                          random_state=seed)
    kept_idx, held_idx = sorted(kept_idx), sorted(held_idx)
    return [samples[i] for i in kept_idx], [samples[i] for i in held_idx], kept_idx, held_idx
