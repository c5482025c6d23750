"""Write a few images of a dataset to disk, one class after another, for demos and smoke tests.

Class names become file and folder names through :func:`safe_name`, which keeps a name that is already safe and
marks any other with a checksum of the original, so that distinct classes never share a folder.
"""
from __future__ import annotations

import os
import re
import zlib
from typing import List, Sequence

_SAFE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_MAX_LENGTH = 100  # of the readable part, well below the 255 bytes file systems allow


def safe_name(name: str) -> str:
    """A class name as a file or folder name of A-Z a-z 0-9 _ . - that is never empty, ``.``, ``..`` or hidden.

    A name that already is one is kept; any other becomes its readable part (runs of other characters as '-')
    followed by ``-`` and the crc32 of the name in hex, so that ``a b`` and ``a-b`` stay apart.
    """
    if _SAFE.fullmatch(name) and len(name) <= _MAX_LENGTH:
        return name
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.")[:_MAX_LENGTH] or "class"
    return f"{readable}-{zlib.crc32(name.encode('utf-8')):08x}"


def safe_names(class_names: Sequence[str]) -> List[str]:
    """:func:`safe_name` of every class; a ValueError when two would share a folder (case-insensitively, as on
    macOS and Windows)."""
    names = [safe_name(name) for name in class_names]
    first = {}
    for original, name in zip(class_names, names):
        other = first.setdefault(name.lower(), original)
        if other != original:
            raise ValueError(f"classes {other!r} and {original!r} both map to the folder name {name!r} (letter case "
                             f"aside, as on macOS and Windows); expected class names that differ in more than case")
    return names


def save_samples(dataset, out_dir: str, n: int, by_class: bool = False) -> List[str]:
    """Save ``n`` images of ``dataset`` (round-robin over classes) as ``NN_<class>.png``, or with
    ``by_class`` as a labelled folder ``<class>/NNNN.png`` (one sub-folder per class, file-safe names).

    ``dataset`` needs ``targets``, ``classes`` and ``load_image(i)``. Returns the written paths.
    """
    # Numbered files never collide; class folders must not (two classes in one folder would merge their labels).
    folders = safe_names(dataset.classes) if by_class else [safe_name(name) for name in dataset.classes]
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
        name = folders[label]
        path = os.path.join(out_dir, name, f"{k:04d}.png") if by_class else os.path.join(out_dir, f"{k:02d}_{name}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        dataset.load_image(index).save(path)
        paths.append(path)
    return paths
