"""Plots saved with runs and tables (matplotlib, no display needed).

* :func:`plot_training_curves` -- loss and accuracy per epoch, (epochs × metrics) table in.
* :func:`plot_confusion_matrix` -- (K, K) counts, rows = true class, normalised per row.
* :func:`plot_accuracy_vs_dim` -- top-1 against representation size, as in the papers' discussions.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import pandas as pd


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(history: pd.DataFrame, path: str) -> str:
    """``history``: one row per epoch with columns such as train_loss_epoch, val_loss, train_top1, val_top1, and
    ``lr-<group>`` (the learning rate of each parameter group, drawn in a third panel when present)."""
    plt = _pyplot()
    # One curve per group: "lr-backbone", or the monitor's "lr-SGD/backbone" where a history holds only that.
    lr_columns = list({c.rsplit("/", 1)[-1].removeprefix("lr-"): c for c in sorted(
        (c for c in history.columns if c.startswith("lr-") and history[c].notna().any()), key=lambda c: -c.count("/"))
    }.values())
    fig, axes = plt.subplots(1, 3 if lr_columns else 2, figsize=(15 if lr_columns else 10, 4))
    ax_loss, ax_acc = axes[0], axes[1]
    epochs = history["epoch"] + 1
    for column, label in (("train_loss_epoch", "train"), ("val_loss", "validation")):
        if column in history and history[column].notna().any():
            ax_loss.plot(epochs, history[column], marker="o", label=label)
    for column, label in (("train_top1", "train top-1"), ("val_top1", "validation top-1"),
                          ("val_mean_class_acc", "validation mean per-class")):
        if column in history and history[column].notna().any():
            ax_acc.plot(epochs, history[column], marker="o", label=label)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1))
    if lr_columns:
        for column in lr_columns:
            axes[2].plot(epochs, history[column], marker="o", label=column.rsplit("/", 1)[-1].removeprefix("lr-"))
        axes[2].set(xlabel="epoch", ylabel="learning rate", title="learning rate per parameter group", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    return _save(fig, path)


def plot_confusion_matrix(counts: np.ndarray, class_names: Optional[Sequence[str]], path: str) -> str:
    plt = _pyplot()
    counts = np.asarray(counts, dtype=float)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    k = len(counts)
    size = min(max(4.0, 0.35 * k), 20.0)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of the true class")
    ax.set(xlabel="predicted", ylabel="true", title=f"confusion matrix ({int(counts.sum())} images)")
    if class_names is not None and k <= 40:
        ax.set_xticks(range(k), class_names, rotation=90, fontsize=7)
        ax.set_yticks(range(k), class_names, fontsize=7)
    return _save(fig, path)


def plot_accuracy_vs_dim(points: pd.DataFrame, path: str) -> str:
    """``points``: columns label, dataset, dim (number), value (top-1 %), kind ('paper' or 'ours')."""
    plt = _pyplot()
    datasets = list(dict.fromkeys(points["dataset"]))
    fig, axes = plt.subplots(1, max(1, len(datasets)), figsize=(5 * max(1, len(datasets)), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        part = points[points["dataset"] == dataset]
        for kind, marker in (("paper", "o"), ("ours", "^")):
            sel = part[part["kind"] == kind]
            ax.scatter(sel["dim"], sel["value"], marker=marker, label=kind)
            for _, row in sel.iterrows():
                ax.annotate(row["label"], (row["dim"], row["value"]), fontsize=6, xytext=(3, 2),
                            textcoords="offset points")
        ax.set_xscale("log")
        ax.set(xlabel="representation dimension", ylabel="top-1 accuracy (%)", title=dataset)
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, path)


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path
