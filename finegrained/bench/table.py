"""``finegrained bench-table``: every head on real images, on a CPU, in minutes.

A frozen, ImageNet-pretrained EfficientNet-Lite0 (last down-sampling removed) maps Fashion-MNIST
images (96 px, 3 channels) to 6×6×1280 feature maps once; a PCA fitted on the training positions
(scikit-learn) reduces them to ``channels`` (64), the fixed counterpart of the heads' learned 1×1
reduction (and LRBP's PCA initialisation). Both are cached on disk, so a rerun only trains heads.

Then every head is trained on the cached maps, and everything a head may choose is chosen on a
validation split (300 further images of the official training set), never on the test split:

* heads without parameters (GAP, B-CNN, improved B-CNN, iSQRT-COV and MPN-COV without reduction,
  DeepO2P, G²DeNet, CBP) pool once; the classifier is scikit-learn's multinomial logistic regression on
  standardised features, its C one of :data:`LOGISTIC_CS`;
* heads with parameters (KP's α, NetVLAD, NetFV, LRBP, HIHCA, SR-SOP, GM-SOP) learn them together with a
  linear classifier in a short Lightning fit (AdamW), at each learning rate of :data:`LEARNING_RATES`;
  the classifier is that linear layer or, on the learned pooling, the same logistic regression as above.
  LRBP computes class scores itself, so only its learning rate is chosen.

The result is a table of the same kind as the paper tables (method, dim, top-1, mean per-class, the
validation accuracy and what it chose, fit time), written to ``results/tables/bench_fashion_mnist.{md,csv}``;
under it, the validation sweep of every head more than 1 point below GAP. Like the CLI, this tool is a
place where data, backbone and heads meet.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Dict, List, Optional

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from finegrained.heads import PoolingHead, available_heads, build_head, head_display_name
from finegrained.callbacks import init_head_from_data
from finegrained.network import FineGrainedNetwork

# Paper defaults, except reductions and widths that would expand the 64 PCA channels, and HIHCA's
# filters and KP's sketches (8,192 and 4,096 in the papers) cut to 2,048 to keep the CPU run short.
BENCH_HEAD_KWARGS: Dict[str, dict] = {
    "gap": {}, "bcnn": {}, "improved_bcnn": {}, "isqrt": {"reduction": None}, "mpncov": {"reduction": None},
    "o2p": {}, "g2de": {}, "cbp": {"output_dim": 8192}, "netvlad": {}, "netfv": {},
    "lrbp": {"reduction": 32, "rank": 8}, "hihca": {"filters": 2048}, "kp": {"sketch_dim": 2048},
    "srsop": {"mid_channels": 64, "out_channels": 32},
    "gmsop": {"components": 16, "top_k": 8, "mid_channels": 64, "out_channels": 32},
    # The 64 PCA channels are already reduced: the covariance heads work on them directly, as isqrt does.
    "dropcov": {"reduction": None}, "isice": {"reduction": None}, "mpa": {"reduction": None}, "sot": {},
}


LEARNING_RATES = (1e-3, 3e-3, 1e-2)
LOGISTIC_CS = (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1)
# Why a head stays more than 1 point below GAP, from measurements on the validation split.
MEASURED_REASONS = {
    "lrbp": "LRBP scores classes with rank-8 bilinear forms on 32 PCA channels and, never forming the bilinear "
            "feature, has no signed square root or l2 normalisation. On the validation split (evaluate_head with "
            "other head_kwargs) it reaches 77.3 % at rank 8, 75.7 % at full rank (32) and 77.7 % on all 64 channels "
            "at full rank, against 80.7 % for B-CNN, the same bilinear feature normalised, with a linear "
            "classifier: more rank does not close the gap, the missing normalisation is what costs.",
}


def _cache_path(cache_dir: str, settings: dict) -> str:
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(cache_dir, f"fashion_mnist_lite0_{key}.pt")


@torch.no_grad()
def _extract(backbone: nn.Module, dataset, batch_size: int, desc: str):
    maps, labels = [], []
    for images, targets in tqdm(DataLoader(dataset, batch_size=batch_size), desc=desc, unit="batch"):
        maps.append(backbone(images))
        labels.append(torch.as_tensor(targets))
    return torch.cat(maps), torch.cat(labels)


def cached_features(per_class: int, test_per_class: int, image_size: int, channels: int, cache_dir: str,
                    data_dir: Optional[str] = None, batch_size: int = 64, val_per_class: int = 30) -> dict:
    """PCA-reduced Lite0 feature maps of the Fashion-MNIST subsets (train, val, test), from the cache when present."""
    settings = {"per_class": per_class, "val_per_class": val_per_class, "test_per_class": test_per_class,
                "image_size": image_size, "channels": channels, "backbone": "efficientnet_lite0/imagenet/last_stride1",
                "seed": 0}
    path = _cache_path(cache_dir, settings)
    if os.path.isfile(path):
        cached = torch.load(path, weights_only=True)
        if cached.get("settings") == settings:
            print(f"features: cached {path}")
            return cached
    from datamodules import FashionMNISTDataModule
    from finegrained.backbones import build_backbone
    from sklearn.decomposition import PCA

    data = FashionMNISTDataModule(data_dir=data_dir, image_size=image_size, subset_per_class=per_class,
                                  val_per_class=val_per_class, test_per_class=test_per_class, num_workers=0)
    data.prepare_data()
    train, val, test = data.build_datasets()
    train.transform = data.eval_transform  # features are extracted once: no augmentation
    backbone = build_backbone("efficientnet_lite0", weights="imagenet", last_stride=1).eval()
    train_maps, train_labels = _extract(backbone, train, batch_size, "Lite0 features (train)")
    val_maps, val_labels = _extract(backbone, val, batch_size, "Lite0 features (val)")
    test_maps, test_labels = _extract(backbone, test, batch_size, "Lite0 features (test)")
    positions = train_maps.permute(0, 2, 3, 1).reshape(-1, train_maps.shape[1]).double().numpy()
    pca = PCA(n_components=channels, random_state=0).fit(positions)
    components = torch.as_tensor(pca.components_, dtype=torch.float32)
    mean = torch.as_tensor(pca.mean_, dtype=torch.float32)

    def project(maps):
        return torch.einsum("kc,bchw->bkhw", components, maps - mean[None, :, None, None]).contiguous()

    cached = {"settings": settings, "train": project(train_maps), "train_labels": train_labels,
              "val": project(val_maps), "val_labels": val_labels,
              "test": project(test_maps), "test_labels": test_labels, "classes": list(data.class_names),
              "explained_variance": float(pca.explained_variance_ratio_.sum())}
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + ".tmp"
    torch.save(cached, tmp)
    os.replace(tmp, path)
    print(f"features: wrote {path}")
    return cached


@torch.no_grad()
def _pool(head: nn.Module, maps: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    return torch.cat([head(maps[i:i + batch_size]) for i in range(0, len(maps), batch_size)]).numpy()


class CachedMaps(nn.Module):
    """The backbone of a network trained on cached feature maps: they pass through (B, C, h, w)."""

    def __init__(self, channels: int):
        super().__init__()
        self.out_channels = channels

    def forward(self, maps):
        return maps


class HeadProbe(pl.LightningModule):
    """A head and its classifier (:class:`~finegrained.network.FineGrainedNetwork`, the network ``fit`` trains)
    trained on cached feature maps."""

    def __init__(self, name: str, channels: int, num_classes: int, features: Optional[torch.Tensor] = None,
                 seed: int = 0, lr: float = 1e-3, weight_decay: float = 1e-4):
        super().__init__()
        self.network = FineGrainedNetwork(num_classes, backbone=CachedMaps(channels), backbone_weights=None, head=name,
                                          head_kwargs=BENCH_HEAD_KWARGS.get(name, {}))
        if self.head.has_data_init:  # the papers' data-dependent initialisations (NetVLAD's k-means, LRBP's PCA)
            init_head_from_data(self.head, features, seed)
        self.lr, self.weight_decay = lr, weight_decay

    @property
    def head(self) -> PoolingHead:
        return self.network.head

    def forward(self, maps):
        return self.network(maps)

    def training_step(self, batch, batch_idx):
        maps, labels = batch
        loss = F.cross_entropy(self(maps), labels)
        if self.head.aux_loss is not None:
            loss = loss + self.head.aux_loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


SPLITS = ("train", "val", "test")


def _logistic_candidates(pooled: Dict[str, np.ndarray], labels: Dict[str, np.ndarray], prefix: str = ""):
    """One candidate per C: (validation accuracy, what was trained, test predictions)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(pooled["train"])
    x = {split: scaler.transform(pooled[split]) for split in SPLITS}
    classifier = LogisticRegression(max_iter=300, warm_start=True)  # each C starts from the previous solution
    for c in sorted(LOGISTIC_CS):
        classifier.set_params(C=c).fit(x["train"], labels["train"])
        yield (float((classifier.predict(x["val"]) == labels["val"]).mean()), f"{prefix}logistic regression (C {c:g})",
               classifier.predict(x["test"]))


def _probe_candidates(name: str, features: dict, labels: Dict[str, np.ndarray], epochs: int, batch_size: int,
                      seed: int):
    """Per learning rate, the head trained with a linear classifier (AdamW) and, on its pooling, the logistic ones."""
    num_classes, channels = len(features["classes"]), features["train"].shape[1]
    for lr in LEARNING_RATES:
        pl.seed_everything(seed, verbose=False)
        probe = HeadProbe(name, channels, num_classes, features["train"], seed, lr=lr)
        head = probe.head
        loader = DataLoader(TensorDataset(features["train"], features["train_labels"]), batch_size=batch_size,
                            shuffle=True)
        trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                             enable_model_summary=False, enable_progress_bar=True)
        trainer.fit(probe, loader)
        probe.eval()
        with torch.no_grad():
            predicted = {split: torch.cat([probe(features[split][i:i + 256]) for i in range(0, len(features[split]), 256)])
                         .argmax(1).numpy() for split in ("val", "test")}
        fit = f"Lightning fit (lr {lr:g}, {epochs} epochs)"
        yield float((predicted["val"] == labels["val"]).mean()), fit, predicted["test"]
        if not head.produces_logits:
            pooled = {split: _pool(head, features[split]) for split in SPLITS}
            yield from _logistic_candidates(pooled, labels, prefix=f"{fit} + ")


def evaluate_head(name: str, features: dict, epochs: int, batch_size: int = 64, seed: int = 0) -> dict:
    """Train ``name`` on the cached maps, choose on the validation split, report on the test split."""
    from sklearn.metrics import balanced_accuracy_score

    pl.seed_everything(seed, verbose=False)
    head = build_head(name, features["train"].shape[1], num_classes=len(features["classes"]),
                      **BENCH_HEAD_KWARGS.get(name, {}))
    labels = {split: features[f"{split}_labels"].numpy() for split in SPLITS}
    started = time.perf_counter()
    if any(p.requires_grad for p in head.parameters()):
        candidates = list(_probe_candidates(name, features, labels, epochs, batch_size, seed))
    else:
        head.eval()
        candidates = list(_logistic_candidates({split: _pool(head, features[split]) for split in SPLITS}, labels))
    val_top1, chosen, predicted = max(candidates, key=lambda c: c[0])  # the first of equals
    sweep = "; ".join(f"{what}: {100 * val:.1f}" for val, what, _ in candidates)
    return {"method": name, "name": head_display_name(name), "dim": head.output_dim,
            "top1": float((predicted == labels["test"]).mean()),
            "mean_class_acc": float(balanced_accuracy_score(labels["test"], predicted)),  # mean per-class recall
            "val_top1": val_top1, "fit_s": time.perf_counter() - started, "trained_by": chosen,
            "validation_sweep": sweep}


def bench_table(heads: List[str], per_class: int = 150, test_per_class: int = 100, image_size: int = 96,
                channels: int = 64, epochs: int = 10, cache_dir: Optional[str] = None,
                out: str = "results/tables/bench_fashion_mnist", val_per_class: int = 30) -> pd.DataFrame:
    unknown = set(heads) - set(available_heads())
    if unknown:
        raise ValueError(f"unknown heads {sorted(unknown)}; known: {', '.join(available_heads())}")
    from datamodules.fashion_mnist import default_data_dir

    cache_dir = cache_dir or os.path.join(default_data_dir(), "bench_table")
    features = cached_features(per_class, test_per_class, image_size, channels, cache_dir, val_per_class=val_per_class)
    rows = []
    for name in heads:
        print(f"--- {name}")
        row = evaluate_head(name, features, epochs)
        print(f"{name}: top-1 {row['top1']:.4f}, validation {row['val_top1']:.4f} ({row['trained_by']}, "
              f"{row['fit_s']:.1f} s)")
        rows.append(row)
    table = pd.DataFrame(rows)
    write_bench_table(table, features, out)
    return table


def _below_gap_notes(table: pd.DataFrame) -> str:
    """The validation sweep, and a measured reason where there is one, of every head > 1 point below GAP."""
    if "gap" not in set(table["method"]):
        return ""
    gap = float(table.loc[table["method"] == "gap", "top1"].iloc[0])
    below = table[table["top1"] < gap - 0.01]
    lines = [f"- **{row['name']}** ({100 * row['top1']:.1f} vs GAP {100 * gap:.1f}): validation sweep (top-1 %) "
             f"{row['validation_sweep']}." + (f" {MEASURED_REASONS[row['method']]}" if row["method"] in MEASURED_REASONS
                                            else "") for _, row in below.iterrows()]
    return ("\nMore than 1 point below GAP on the test split:\n\n" + "\n".join(lines) + "\n") if lines else ""


def write_bench_table(table: pd.DataFrame, features: dict, out: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    table.to_csv(out + ".csv", index=False)
    n_train, n_val, n_test = (len(features[f"{split}_labels"]) for split in SPLITS)
    shown = pd.DataFrame({
        "Method": table["name"], "Dim": table["dim"].map(lambda d: f"{d:,}"),
        "Top-1 (%)": (100 * table["top1"]).map(lambda v: f"{v:.1f}"),
        "Mean per-class (%)": (100 * table["mean_class_acc"]).map(lambda v: f"{v:.1f}"),
        "Val top-1 (%)": (100 * table["val_top1"]).map(lambda v: f"{v:.1f}"),
        "Chosen on validation": table["trained_by"], "Fit (s)": table["fit_s"].map(lambda v: f"{v:.0f}")})
    best = table["top1"].max()
    shown.loc[table["top1"] == best, "Top-1 (%)"] = shown.loc[table["top1"] == best, "Top-1 (%)"].map(lambda v: f"**{v}**")
    text = (f"### Every head on Fashion-MNIST: frozen EfficientNet-Lite0 (ImageNet), {features['train'].shape[1]} PCA "
            f"channels, {features['train'].shape[2]}×{features['train'].shape[3]} map\n\n"
            f"{n_train} training / {n_val} validation / {n_test} test images (validation: further images of the "
            f"official training set; test: the official test set); PCA keeps "
            f"{100 * features['explained_variance']:.0f}% of the variance. Learning rate and classifier are chosen on "
            f"validation. Measured by `finegrained bench-table`.\n\n"
            + shown.to_markdown(index=False) + "\n" + _below_gap_notes(table))
    with open(out + ".md", "w") as f:
        f.write(text)
    print(text)
    return out + ".md"
