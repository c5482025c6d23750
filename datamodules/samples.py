"""Write a few images of a dataset to disk, one class after another, for demos and smoke tests."""
from __future__ import annotations

import os
import re
from typing import List


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "class"


def save_samples(dataset, out_dir: str, n: int) -> List[str]:
    """Save ``n`` images of ``dataset`` (round-robin over classes) as ``NN_<class>.png``.

    ``dataset`` needs ``targets``, ``classes`` and ``load_image(i)``. Returns the written paths.
    """
    os.makedirs(out_dir, exist_ok=True)
    by_class = {}
    for index, label in enumerate(dataset.targets):
        by_class.setdefault(label, []).append(index)
    order, depth = [], 0
    while len(order) < min(n, len(dataset.targets)):
        for label in sorted(by_class):
            if depth < len(by_class[label]) and len(order) < n:
                order.append((by_class[label][depth], label))
        depth += 1
    paths = []
    for k, (index, label) in enumerate(order):
        path = os.path.join(out_dir, f"{k:02d}_{_safe_name(dataset.classes[label])}.png")
        dataset.load_image(index).save(path)
        paths.append(path)
    return paths
