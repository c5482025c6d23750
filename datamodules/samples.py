"""Write a few images of a dataset to disk, one class after another, for demos and smoke tests."""
from __future__ import annotations

import os
import re
from typing import List


def safe_name(name: str) -> str:
    """A class name as a file or folder name: runs of other characters than A-Z a-z 0-9 _ . - become '-'."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "class"


def save_samples(dataset, out_dir: str, n: int, by_class: bool = False) -> List[str]:
    """Save ``n`` images of ``dataset`` (round-robin over classes) as ``NN_<class>.png``, or with
    ``by_class`` as a labelled folder ``<class>/NNNN.png`` (one sub-folder per class, file-safe names).

    ``dataset`` needs ``targets``, ``classes`` and ``load_image(i)``. Returns the written paths.
    """
    os.makedirs(out_dir, exist_ok=True)
    indices_of = {}
    for index, label in enumerate(dataset.targets):
        indices_of.setdefault(label, []).append(index)
    order, depth = [], 0
    while len(order) < min(n, len(dataset.targets)):
        for label in sorted(indices_of):
            if depth < len(indices_of[label]) and len(order) < n:
                order.append((indices_of[label][depth], label))
        depth += 1
    paths = []
    for k, (index, label) in enumerate(order):
        name = safe_name(dataset.classes[label])
        path = os.path.join(out_dir, name, f"{k:04d}.png") if by_class else os.path.join(out_dir, f"{k:02d}_{name}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        dataset.load_image(index).save(path)
        paths.append(path)
    return paths
