"""What a campaign costs in GPU-hours: each job's training epochs × its training images ÷ the training step's
images/s that ``finegrained bench step`` measured for the same backbone, head and crop on a GPU.

Counted: the fine-tuning epochs (``trainer.max_epochs``) over the official training split. Not counted, and said so
in the output: the per-epoch evaluation of the test split (forward passes only), a two-stage protocol's first stage
(``stage1``: a classifier on frozen or cached features, much cheaper per epoch), data loading stalls, and requeues.
With DDP over G GPUs the GPU-hours stay the same at ideal scaling; the wall time is divided by G.

Training-split sizes, from the datasets' papers: CUB-200-2011 5,994 (Wah et al., "The Caltech-UCSD Birds-200-2011
Dataset", 2011), FGVC-Aircraft trainval 6,667 (Maji et al., "Fine-Grained Visual Classification of Aircraft",
2013), Stanford Cars 8,144 (Krause et al., "3D Object Representations for Fine-Grained Categorization", 2013).
"""
from __future__ import annotations

import glob
import os
from typing import Any, Dict, List, Optional

import pandas as pd

TRAIN_IMAGES = {
    "datamodules.CUB200DataModule": 5994,
    "datamodules.FGVCAircraftDataModule": 6667,
    "datamodules.StanfordCarsDataModule": 8144,
}


def measured_steps(bench_folder: str) -> pd.DataFrame:
    """Every GPU training-step measurement under ``bench_folder`` (``step_cuda*.csv``), newest last."""
    paths = sorted(glob.glob(os.path.join(glob.escape(bench_folder), "step_cuda*.csv")))
    frames = [pd.read_csv(path) for path in paths]
    if not frames:
        return pd.DataFrame(columns=["backbone", "head", "size", "images_per_s", "gpu", "timestamp"])
    return pd.concat(frames, ignore_index=True).sort_values("timestamp", kind="stable")


def job_cost(config: Any, steps: pd.DataFrame) -> Dict[str, Any]:
    """The cost row of one job from its parsed fit configuration (``config.trainer``, ``.model``, ``.data``)."""
    data_class = config.data.class_path if "class_path" in config.data else ""
    crop = config.data.init_args.get("crop_size")
    crop = crop[0] if isinstance(crop, (list, tuple)) else crop
    row: Dict[str, Any] = {"backbone": config.model.backbone, "head": config.model.head, "crop": crop,
                           "epochs": config.trainer.max_epochs, "train_images": TRAIN_IMAGES.get(data_class),
                           "images_per_s": None, "gpu": "", "gpu_hours": None}
    match = steps[(steps["backbone"] == row["backbone"]) & (steps["head"] == row["head"])
                  & (steps["size"] == crop)] if len(steps) else steps
    if len(match):
        row["images_per_s"], row["gpu"] = float(match["images_per_s"].iloc[-1]), str(match["gpu"].iloc[-1])
    if row["images_per_s"] and row["train_images"] and row["epochs"]:
        row["gpu_hours"] = row["epochs"] * row["train_images"] / row["images_per_s"] / 3600
    return row


def cost_table(rows: List[Dict[str, Any]]) -> str:
    """The rows as a table, with what is missing said in words."""
    frame = pd.DataFrame(rows)
    frame["images_per_s"] = frame["images_per_s"].map(
        lambda v: "not measured" if v is None or pd.isna(v) else f"{v:.0f}")
    frame["train_images"] = frame["train_images"].map(lambda v: "unknown" if v is None or pd.isna(v) else int(v))
    frame["gpu_hours"] = frame["gpu_hours"].map(lambda v: "—" if v is None or pd.isna(v) else f"{v:.2f}")
    return frame.to_string(index=False)


def total_hours(rows: List[Dict[str, Any]]) -> Optional[float]:
    known = [row["gpu_hours"] for row in rows if row["gpu_hours"] is not None]
    return sum(known) if known else None
