"""``finegrained bench loader``: images/s per core to decode and transform 1600×1067 JPEGs to 448 crops.

The project's pipeline (JPEG draft decoding, one-pass tensor conversion) against plain PIL +
torchvision, timed in interleaved rounds on one core; and the same images read from WebDataset shards
(``finegrained data shard``: stored resized to the shorter side ``resize``, JPEG quality 90), through
:class:`datamodules.shards.ShardDataset` and the same transform.
"""
from __future__ import annotations

import os
from typing import List

import torch

from finegrained.bench.timing import interleaved_medians


def _sample_jpegs(folder: str, n: int, size=(1600, 1067)) -> List[str]:
    """n JPEGs of real photos (scikit-image's samples when installed) enlarged to ``size``, quality 90."""
    import numpy as np
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    photos = []
    try:
        from skimage import data

        for name in ("chelsea", "coffee", "astronaut", "rocket", "cat", "hubble_deep_field"):
            if hasattr(data, name):
                photos.append(getattr(data, name)())
    except Exception:  # scikit-image is a dev extra; fall back to smooth synthetic scenes
        pass
    if not photos:
        yy, xx = np.mgrid[0:480, 0:640]
        photos = [np.stack([(xx * (k + 1)) % 255, (yy * 2 + k * 40) % 255, ((xx + yy) // 3) % 255], -1).astype(np.uint8)
                  for k in range(4)]
    paths = []
    for k in range(n):
        path = os.path.join(folder, f"photo_{k}.jpg")
        if not os.path.isfile(path):
            image = Image.fromarray(photos[k % len(photos)]).convert("RGB").resize(size, Image.BICUBIC)
            image.save(path, quality=90)
        paths.append(path)
    return paths


def bench_loader(folder: str, n: int = 24, repeats: int = 5, resize: int = 448, crop: int = 448) -> List[dict]:
    from PIL import Image
    from torchvision import transforms

    from datamodules.io import decode_rgb
    from datamodules.transforms import train_transform

    from datamodules.shards import ShardDataset, index_split, write_split

    paths = _sample_jpegs(folder, n)
    shard_dir = os.path.join(folder, f"shards_{n}_{resize}")
    if not os.path.isdir(shard_dir):
        os.makedirs(shard_dir)
        write_split(((Image.open(p), 0) for p in paths), shard_dir, "train", size=resize, shard_size=max(1, n // 2))
    shards = ShardDataset(shard_dir, index_split(shard_dir, "train"), ["photo"])
    ours = train_transform(resize, crop)
    plain = transforms.Compose([
        transforms.Resize(resize), transforms.RandomCrop(crop), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        def project():
            for p in paths:
                ours(decode_rgb(p, resize=resize)[0])

        def baseline():
            for p in paths:
                with Image.open(p) as im:
                    plain(im.convert("RGB"))

        def sharded():
            for k in range(len(shards)):
                ours(shards.load_image(k))

        timings = interleaved_medians({"ours": project, "plain": baseline, "shards": sharded}, torch.device("cpu"),
                                      repeats, warmup=1)
        t_ours, t_plain, t_shards = timings["ours"], timings["plain"], timings["shards"]
    finally:
        torch.set_num_threads(threads)
    return [{"pipeline": "PIL + torchvision (baseline)", "images_per_s_per_core": n / t_plain, "speedup": 1.0},
            {"pipeline": "finegrained (JPEG draft decode)", "images_per_s_per_core": n / t_ours,
             "speedup": t_plain / t_ours},
            {"pipeline": f"WebDataset shards (stored at {resize} px)", "images_per_s_per_core": n / t_shards,
             "speedup": t_plain / t_shards}]

