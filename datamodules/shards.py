"""WebDataset shards for data that should not be read as millions of small files (iNaturalist-sized sets).

Format: WebDataset (Aizman, Maltby, Breuel, "High performance I/O for large scale deep learning", 2019): plain
POSIX tar files, one sample = ``<key>.jpg`` (the image, resized so that its shorter side is ``size``, JPEG) +
``<key>.cls`` (the label), written with ``webdataset.ShardWriter``. Chosen over LitData's format because a tar
shard is readable by any tool (``tar tf``), by webdataset's own loaders and by this module, with no server or
binary index, and it is what timm and OpenCLIP stream. ``index.json`` beside the shards records the class names,
the preprocessing and, per split, every shard with the byte offset, size, label and key of each sample.

:func:`write_shards` writes them (``finegrained data shard``) into a new or empty folder, or replaces an earlier
output that ``index.json`` lists in full; :class:`ShardDataModule` reads them. Samples decode through
:mod:`datamodules.io`: an unreadable one is an error naming the shard and key, or with ``skip_corrupt`` is logged
and replaced as in the file-based datasets. Each epoch,
the shard order is permuted (seed + epoch); the concatenated samples are cut into N contiguous parts, one per
process, so that each process reads a few shards from start to end; within a part, samples are shuffled in
blocks of ``shuffle_block`` (reads stay near-sequential); and every part is split into the same number of
batches (sizes differ by at most one). Over N processes each sample is read exactly once per epoch, every process
takes the same number of steps (no collective waits for a missing batch), and an epoch's order depends only on
(seed, epoch). The training loader is stateful for Lightning (``state_dict``/``load_state_dict``, saved in every
checkpoint): a fit resumed from a checkpoint taken mid-epoch replays that epoch's order and goes on after the last
batch it trained on, without reading the skipped samples.
"""
from __future__ import annotations

import io
import json
import math
import os
import tarfile
import warnings
from functools import cached_property
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from datamodules.base import FineGrainedDataModule
from datamodules.datasets import first_readable
from datamodules.io import decode_bytes

INDEX = "index.json"
SPLITS = ("train", "val", "test")


def _jpeg_bytes(image: Image.Image, size: int, quality: int) -> bytes:
    image = image.convert("RGB")
    scale = size / min(image.size)
    if scale < 1:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _tar_index(path: str) -> List[Tuple[str, int, int, int]]:
    """``(key, jpg offset, jpg size, label)`` of every sample of a WebDataset shard, in file order."""
    samples: Dict[str, dict] = {}
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            entry = samples.setdefault(key, {})
            if ext == "jpg":
                entry["jpg"] = (member.offset_data, member.size)
            elif ext == "cls":
                entry["cls"] = int(tar.extractfile(member).read().decode())
    missing = [k for k, v in samples.items() if "jpg" not in v or "cls" not in v]
    if missing:
        raise ValueError(f"{path}: sample {missing[0]!r} lacks its .jpg or .cls member")
    return [(k, v["jpg"][0], v["jpg"][1], v["cls"]) for k, v in samples.items()]


def write_split(images, out_dir: str, split: str, size: int = 512, shard_size: int = 1000,
                quality: int = 90, written: Optional[List[str]] = None) -> List[dict]:
    """Write ``(PIL image, label)`` pairs as ``<split>-NNNNNN.tar`` shards; returns the index entries of the
    shards written (and of no other file in ``out_dir``). Each shard's path is appended to ``written`` once
    closed, also when writing fails half-way."""
    import webdataset

    pattern = os.path.join(out_dir, f"{split}-%06d.tar")
    written = [] if written is None else written
    start = len(written)
    with webdataset.ShardWriter(pattern, maxcount=shard_size, verbose=0, post=written.append) as sink:
        for k, (image, label) in enumerate(images):
            sink.write({"__key__": f"{k:09d}", "jpg": _jpeg_bytes(image, size, quality), "cls": str(int(label)).encode()})
    return index_split(out_dir, split, [os.path.basename(path) for path in written[start:]])


def index_split(out_dir: str, split: str, names: Optional[Sequence[str]] = None) -> List[dict]:
    """``[{"shard": name, "samples": [[offset, size, label, key], ...]}, ...]`` of the shards ``names`` (by
    default every ``<split>-*.tar`` in ``out_dir``)."""
    if names is None:
        names = sorted(f for f in os.listdir(out_dir) if f.startswith(f"{split}-") and f.endswith(".tar"))
    return [{"shard": name, "samples": [[offset, size, label, key]
                                        for key, offset, size, label in _tar_index(os.path.join(out_dir, name))]}
            for name in names]


def _previous_output(out_dir: str) -> List[str]:
    """The files of an earlier ``write_shards`` output in ``out_dir`` (its shards and index), all there is in it;
    otherwise a ValueError saying what else the folder holds."""
    path = os.path.join(out_dir, INDEX)
    try:
        with open(path) as f:
            splits = json.load(f)["splits"]
        listed = {INDEX} | {shard["shard"] for shards in splits.values() for shard in shards}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{out_dir}: not the output of finegrained data shard ({path} is missing or unreadable: "
                         f"{err}); expected a new or empty folder, or one holding only a previous shard output "
                         f"(--overwrite)") from err
    present = sorted(os.listdir(out_dir))
    others = [name for name in present if name not in listed or not os.path.isfile(os.path.join(out_dir, name))
              or os.path.islink(os.path.join(out_dir, name))]
    if others:
        raise ValueError(f"{out_dir}: holds {len(others)} file(s) that {INDEX} does not list ({', '.join(others[:3])}"
                         f"{', ...' if len(others) > 3 else ''}); expected only a previous shard output to replace "
                         f"(remove them or choose another --out)")
    return present


def _images(dataset, desc: str):
    """``(image, label)`` of every sample, with a progress bar that is closed (its line ended) before an error
    leaves, so that the error starts a line of its own."""
    with tqdm(range(len(dataset)), desc=desc, unit="img") as indices:
        for k in indices:
            yield dataset.load_image(k), dataset.targets[k]


def write_shards(datamodule: FineGrainedDataModule, out_dir: str, size: int = 512, shard_size: int = 1000,
                 quality: int = 90, splits: Sequence[str] = SPLITS, overwrite: bool = False) -> str:
    """Write the splits of ``datamodule`` (its images before any transform) as WebDataset shards; returns the
    index path. A split that is the test split again (validation = test) is written once, as test.

    ``out_dir`` must be new or empty: shards of another run beside the new ones would be read with them. With
    ``overwrite``, a previous output there is replaced: the files its ``index.json`` lists are removed, and a folder
    holding anything else is refused.
    """
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir}: not a folder; expected a new or empty folder for the shards")
    previous = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []
    if previous and not overwrite:
        raise ValueError(f"{out_dir}: not empty ({', '.join(previous[:3])}{', ...' if len(previous) > 3 else ''}); "
                         f"expected a new or empty folder for the shards (--overwrite replaces a previous shard "
                         f"output there)")
    if previous:
        previous = _previous_output(out_dir)
    datamodule.setup("fit")
    for name in previous:  # only now: a DataModule that cannot be read leaves the previous output in place
        os.remove(os.path.join(out_dir, name))
    os.makedirs(out_dir, exist_ok=True)
    datasets = {"train": datamodule.train_dataset, "val": datamodule.val_dataset, "test": datamodule.test_dataset}
    index = {"classes": list(datamodule.class_names), "size": size, "splits": {},
             "dataset_id": getattr(datamodule, "dataset_id", "custom"),
             "dataset_name": getattr(datamodule, "dataset_name", type(datamodule).__name__)}
    written: List[str] = []
    try:
        for split in splits:
            dataset = datasets[split]
            if split == "val" and dataset is datamodule.test_dataset:
                continue
            index["splits"][split] = write_split(_images(dataset, f"shard {split}"), out_dir, split, size,
                                                 shard_size, quality, written)
    except BaseException:
        # An unreadable image (or an interrupt) half-way: remove this run's shards, which no index lists, so that
        # the folder is empty again for the next attempt.
        for shard in written:
            if os.path.isfile(shard):
                os.remove(shard)
        raise
    path = os.path.join(out_dir, INDEX)
    with open(path, "w") as f:
        json.dump(index, f)
    return path


class ShardDataset(Dataset):
    """The samples of one split's shards. ``dataset[[i, j, ...]]`` reads a batch: (images (B, 3, H, W), labels (B,))."""

    def __init__(self, folder: str, shards: List[dict], classes: List[str], transform=None):
        self.folder, self.classes, self.transform = folder, list(classes), transform
        self.records: List[Tuple[int, int, int]] = []  # (shard number, offset, size)
        self.keys: List[Optional[str]] = []  # None for [offset, size, label] entries, which name no key
        self.targets: List[int] = []
        self.shard_paths = [os.path.join(folder, s["shard"]) for s in shards]
        self.shard_starts = []
        for number, shard in enumerate(shards):
            self.shard_starts.append(len(self.records))
            for offset, size, label, *key in shard["samples"]:
                self.records.append((number, offset, size))
                self.keys.append(str(key[0]) if key else None)
                self.targets.append(int(label))
        self.skip_corrupt = False  # set by the DataModule: see FineGrainedDataModule's skip_corrupt
        self.skipped: set = set()

    def __len__(self) -> int:
        return len(self.records)

    def sample_name(self, index: int) -> str:
        number, offset, _ = self.records[index]
        key = self.keys[index]
        return f"{self.shard_paths[number]}: " + (f"sample {key}" if key is not None else f"sample at byte {offset}")

    def load_image(self, index: int) -> Image.Image:
        number, offset, size = self.records[index]
        with open(self.shard_paths[number], "rb") as f:
            f.seek(offset)
            data = f.read(size)
        return decode_bytes(data, self.sample_name(index))

    def item(self, index: int):
        image, read = first_readable(self, index)
        return (self.transform(image) if self.transform else image), self.targets[read]

    def __getitem__(self, index):
        if isinstance(index, (list, tuple)):
            items = [self.item(i) for i in index]
            return torch.stack([image for image, _ in items]), torch.tensor([label for _, label in items])
        return self.item(index)


class ExactShardSampler(DistributedSampler):
    """Batches of sample indices for one process (see the module docstring). A ``DistributedSampler``, so Lightning
    keeps it under DDP and calls :meth:`set_epoch` every epoch."""

    def __init__(self, dataset: ShardDataset, batch_size: int, num_replicas: int, rank: int, shuffle: bool = True,
                 seed: int = 0, shuffle_block: int = 256):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.batch_size, self.shuffle_block = batch_size, shuffle_block
        longest = math.ceil(len(dataset) / num_replicas)
        self.batches = max(1, math.ceil(longest / batch_size))
        self.start_batch = 0  # batches of the next iteration to skip (a resumed epoch); used once

    def part(self) -> np.ndarray:
        """This process's sample indices for the current epoch, in reading order."""
        dataset: ShardDataset = self.dataset
        rng = np.random.default_rng(self.seed + self.epoch)
        order = rng.permutation(len(dataset.shard_paths)) if self.shuffle else np.arange(len(dataset.shard_paths))
        bounds = dataset.shard_starts + [len(dataset)]
        stream = np.concatenate([np.arange(bounds[s], bounds[s + 1]) for s in order]) if len(order) else np.arange(0)
        cuts = np.linspace(0, len(stream), self.num_replicas + 1).round().astype(int)
        part = stream[cuts[self.rank]:cuts[self.rank + 1]]
        if self.shuffle:
            blocks = [rng.permutation(part[i:i + self.shuffle_block]) for i in range(0, len(part), self.shuffle_block)]
            part = np.concatenate(blocks) if blocks else part
        return part

    def __iter__(self) -> Iterator[List[int]]:
        start, self.start_batch = self.start_batch, 0
        for batch in np.array_split(self.part(), self.batches)[start:]:
            if len(batch):
                yield batch.tolist()

    def __len__(self) -> int:
        return self.batches


class ShardLoader(DataLoader):
    """A loader of :class:`ExactShardSampler` batches whose position Lightning saves in checkpoints.

    State: the epoch, the batches of it consumed, and the process count and batches per epoch that give those
    batches their meaning. Restored into the same epoch with the same process count and batch size, the next
    iteration skips the consumed batches. With other settings it warns and starts the epoch from its beginning;
    Lightning still takes only the steps left in that epoch, so that one epoch may see some samples twice and miss
    others (as with any loader that cannot resume); later epochs are whole. Iteration starts at the first batch
    requested, so the epoch Lightning sets after creating the iterator is the one read, with or without workers.
    """

    def __init__(self, dataset: ShardDataset, sampler: ExactShardSampler, num_workers: int = 0):
        super().__init__(dataset, sampler=sampler, batch_size=None, num_workers=num_workers,
                         persistent_workers=num_workers > 0)
        self.consumed = 0
        self._resume: Optional[Dict[str, int]] = None

    def _layout(self) -> Dict[str, int]:
        return {"world": self.sampler.num_replicas, "batches_per_epoch": len(self.sampler), "seed": self.sampler.seed}

    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": int(self.sampler.epoch), "batches": self.consumed, **self._layout()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        saved = {key: state.get(key) for key in self._layout()}
        if saved != self._layout():
            warnings.warn(f"shard loader state was saved with {saved}, this run has {self._layout()}: the resumed "
                          f"epoch starts from its first batch for the steps left in it (some of its samples may be "
                          f"seen twice and others missed; later epochs are whole)")
            return
        self._resume = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}

    def __iter__(self):
        return self._batches()

    def _batches(self):
        # A generator: nothing below runs (and no worker is handed an index) before the first batch is asked for.
        start = 0
        if self._resume is not None:
            resume, self._resume = self._resume, None
            if resume["epoch"] == self.sampler.epoch:
                start = resume["batches"]
        self.sampler.start_batch = start
        self.consumed = start
        for batch in super().__iter__():
            self.consumed += 1
            yield batch


class ShardDataModule(FineGrainedDataModule):
    """Args:
        root: the folder written by ``finegrained data shard`` (shards and ``index.json``).
        shuffle_block: samples shuffled together within a process's part of an epoch.
        seed: of the per-epoch orders.
        **kwargs: loader and transform settings of :class:`~datamodules.base.FineGrainedDataModule`.
    """

    def __init__(self, root: str, shuffle_block: int = 256, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.root, self.shuffle_block, self.seed = root, shuffle_block, seed
        self.save_hyperparameters()

    @cached_property
    def _index(self) -> dict:
        path = os.path.join(self.root, INDEX)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"shard index not found: {path} (expected the output of finegrained data shard)")
        with open(path) as f:
            return json.load(f)

    @property
    def class_names(self) -> List[str]:
        return list(self._index["classes"])

    @property
    def dataset_id(self) -> str:
        """The id of the dataset the shards were written from (``custom`` when the index does not say)."""
        return str(self._index.get("dataset_id", "custom"))

    @property
    def dataset_name(self) -> str:
        return f"{self._index.get('dataset_name', 'dataset')} (shards)"

    @property
    def validation_is_test(self) -> bool:
        return "val" not in self._index["splits"]

    def build_datasets(self):
        index = self._index
        splits = index["splits"]
        for name in ("train", "test"):
            if name not in splits:
                raise ValueError(f"{os.path.join(self.root, INDEX)}: no {name} shards")
        make = lambda name, transform: ShardDataset(self.root, splits[name], index["classes"], transform)  # noqa: E731
        test = make("test", self.eval_transform)
        val = make("val", self.eval_transform) if "val" in splits else test
        return make("train", self.train_transform), val, test

    def _world(self) -> Tuple[int, int]:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size(), torch.distributed.get_rank()
        return 1, 0

    def _loader(self, dataset: ShardDataset, shuffle: bool) -> DataLoader:
        # The base class's train/val/test/predict loaders come here: every one reads batches of its process's part.
        world, rank = self._world()
        sampler = ExactShardSampler(dataset, self.batch_size, world, rank, shuffle=shuffle, seed=self.seed,
                                    shuffle_block=self.shuffle_block)
        return ShardLoader(dataset, sampler, num_workers=self.num_workers)


def read_order(root: str, world: int, rank: int, epoch: int, batch_size: int = 4, seed: int = 0) -> List[int]:
    """The sample indices process ``rank`` of ``world`` reads in ``epoch`` (for tests and diagnostics)."""
    dm = ShardDataModule(root, batch_size=batch_size, num_workers=0, seed=seed)
    dm.setup("fit")
    sampler = ExactShardSampler(dm.train_dataset, batch_size, world, rank, seed=seed, shuffle_block=dm.shuffle_block)
    sampler.set_epoch(epoch)
    return [i for batch in sampler for i in batch]


def shard_counts(root: str) -> Dict[str, int]:
    with open(os.path.join(root, INDEX)) as f:
        return {split: sum(len(s["samples"]) for s in shards) for split, shards in json.load(f)["splits"].items()}

