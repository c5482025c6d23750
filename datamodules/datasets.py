"""Map-style datasets shared by the DataModules.

* :class:`ImageListDataset` -- (path, label) samples read from disk.
* :class:`ArrayImageDataset` -- uint8 image arrays in memory (Fashion-MNIST).

Both return ``(tensor, label)`` and expose ``classes``, ``targets`` and ``load_image(i)``
(a PIL RGB image before the transforms).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

from PIL import Image
from torch.utils.data import Dataset

from datamodules.io import load_rgb


class ImageListDataset(Dataset):
    def __init__(self, samples: Sequence[Tuple[str, int]], classes: Sequence[str],
                 transform: Optional[Callable] = None):
        self.samples: List[Tuple[str, int]] = list(samples)
        self.classes = list(classes)
        self.transform = transform

    @property
    def targets(self) -> List[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, index: int) -> Image.Image:
        return load_rgb(self.samples[index][0])

    def __getitem__(self, index: int):
        image = self.load_image(index)
        return (self.transform(image) if self.transform else image), self.samples[index][1]


class ArrayImageDataset(Dataset):
    """Images as a (N, H, W) or (N, H, W, 3) uint8 array; grayscale is given 3 channels."""

    def __init__(self, images, targets: Sequence[int], classes: Sequence[str],
                 transform: Optional[Callable] = None):
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} labels")
        self.images = images
        self.targets = [int(t) for t in targets]
        self.classes = list(classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def load_image(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index]).convert("RGB")

    def __getitem__(self, index: int):
        image = self.load_image(index)
        return (self.transform(image) if self.transform else image), self.targets[index]
