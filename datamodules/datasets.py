"""Map-style datasets shared by the DataModules.

* :class:`ImageListDataset` -- (path, label) samples read from disk.
* :class:`ArrayImageDataset` -- uint8 image arrays in memory (Fashion-MNIST).

Both return ``(tensor, label)`` and expose ``classes``, ``targets`` and ``load_image(i)``
(a PIL RGB image before the transforms). :func:`first_readable` is the ``skip_corrupt`` policy of every
dataset read from files (these and the shards).
"""
from __future__ import annotations

import logging
from typing import Callable, List, Optional, Protocol, Sequence, Tuple

from PIL import Image
from torch.utils.data import Dataset

from datamodules.io import ImageLoadError, decode_cropped

log = logging.getLogger(__name__)


Box = Tuple[float, float, float, float]


class SkippableDataset(Protocol):
    """What :func:`first_readable` needs of a dataset."""

    skip_corrupt: bool  # set by the DataModule: see FineGrainedDataModule's skip_corrupt
    skipped: set  # names of the samples skipped so far (each is logged once)

    def __len__(self) -> int: ...

    def load_image(self, index: int) -> Image.Image: ...

    def sample_name(self, index: int) -> str: ...


def first_readable(dataset: SkippableDataset, index: int) -> Tuple[Image.Image, int]:
    """``(image, its sample index)``: sample ``index``, or with ``dataset.skip_corrupt`` the first readable sample
    from it on (wrapping around); each unreadable one is logged once and recorded in ``dataset.skipped``.
    Without skip_corrupt an unreadable image raises its :class:`ImageLoadError`."""
    for offset in range(len(dataset) if dataset.skip_corrupt else 1):
        candidate = (index + offset) % len(dataset)
        try:
            return dataset.load_image(candidate), candidate
        except ImageLoadError as err:
            if not dataset.skip_corrupt:
                raise ImageLoadError(f"{err} (data.init_args.skip_corrupt true skips unreadable images; "
                                     f"finegrained data verify lists them all)") from err
            name = dataset.sample_name(candidate)
            if name not in dataset.skipped:
                dataset.skipped.add(name)
                log.warning("skip_corrupt: skipping %s (%s); the next readable image is used instead", name, err)
    raise ImageLoadError(f"skip_corrupt: none of the {len(dataset)} images of this split can be read")


class ImageListDataset(Dataset):
    """Args:
        samples: (path, label) pairs.
        classes: class names, index = label.
        transform: applied to the PIL image.
        boxes: optional per-sample crop box (left, upper, right, lower) in stored pixel coordinates.
        bottom_crop: rows removed at the bottom of every image (FGVC-Aircraft's copyright banner).
        resize: the transform's resize target; large JPEGs are then decoded at a reduced scale.
        exif_transpose: turn every image upright by its EXIF orientation (after the crops, which are in stored
            pixels).
    """

    def __init__(self, samples: Sequence[Tuple[str, int]], classes: Sequence[str],
                 transform: Optional[Callable] = None, boxes: Optional[Sequence[Optional[Box]]] = None,
                 bottom_crop: int = 0, resize=None, exif_transpose: bool = False):
        self.samples: List[Tuple[str, int]] = list(samples)
        self.classes = list(classes)
        self.transform = transform
        self.boxes = list(boxes) if boxes is not None else None
        if self.boxes is not None and len(self.boxes) != len(self.samples):
            raise ValueError(f"{len(self.boxes)} boxes for {len(self.samples)} samples")
        self.bottom_crop = bottom_crop
        self.resize = resize
        self.exif_transpose = exif_transpose
        self.skip_corrupt = False  # set by the DataModule: see FineGrainedDataModule's skip_corrupt
        self.skipped: set = set()

    @property
    def targets(self) -> List[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, index: int) -> Image.Image:
        """The image after the dataset's crops (banner, box) and before the transforms."""
        box = self.boxes[index] if self.boxes is not None else None
        return decode_cropped(self.samples[index][0], self.resize, self.bottom_crop, box, self.exif_transpose)

    def sample_name(self, index: int) -> str:
        return self.samples[index][0]

    def __getitem__(self, index: int):
        image, read = first_readable(self, index)
        return (self.transform(image) if self.transform else image), self.samples[read][1]


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
