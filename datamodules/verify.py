"""Walk a whole dataset, decode every image, and report counts and problems (``finegrained data verify``)."""
from __future__ import annotations

import sys
from collections import Counter
from typing import List, Tuple

from tqdm import tqdm

from datamodules.io import ImageLoadError


def verify_datamodule(datamodule, out=None) -> List[Tuple[str, str]]:
    """Decode every image of every split; print counts per split and class and the problems found.

    Returns the problems as ``(split, message)``; an empty list means the dataset is sound.
    """
    out = out or sys.stdout
    datamodule.setup("fit")
    splits = [("train", datamodule.train_dataset), ("val", datamodule.val_dataset), ("test", datamodule.test_dataset)]
    problems, counts = [], {}
    for name, dataset in splits:
        if name == "val" and dataset is datamodule.test_dataset:
            print("val: the test set serves as validation set", file=out)
            continue
        counts[name] = Counter(dataset.targets)
        for index in tqdm(range(len(dataset)), desc=f"verify {name}", unit="img", file=sys.stderr):
            try:
                dataset.load_image(index)
            except ImageLoadError as err:
                problems.append((name, str(err)))
    classes = datamodule.class_names
    print(f"{len(classes)} classes; " + ", ".join(f"{n}: {sum(c.values())} images" for n, c in counts.items()), file=out)
    width = max(len(c) for c in classes)
    print(f"{'class':<{width}}  " + "  ".join(f"{n:>6}" for n in counts), file=out)
    for k, cls in enumerate(classes):
        print(f"{cls:<{width}}  " + "  ".join(f"{c[k]:>6}" for c in counts.values()), file=out)
    empty = [cls for k, cls in enumerate(classes) if counts.get("train", Counter())[k] == 0]
    if empty:
        problems.append(("train", f"classes without training images: {empty[:20]}"))
    if problems:
        print(f"{len(problems)} problem(s):", file=out)
        for split, message in problems:
            print(f"  [{split}] {message}", file=out)
    else:
        print("no problems found", file=out)
    return problems
