"""The accuracies ``finegrained test`` prints and records: top-1, top-5 and mean per-class accuracy.

Shapes: logits (B, K) float, labels (B,) int64 -> scalar tensors, accumulated over batches (and summed over
processes under DDP by torchmetrics).

* top-1 / top-5: the share of images whose label is among the 1 / 5 highest logits (torchmetrics'
  ``MulticlassAccuracy(average="micro")``).
* mean per-class accuracy: the mean, over the classes that occur in the labels, of the share of each class's
  images predicted as that class. This is scikit-learn's ``balanced_accuracy_score`` and what ``finegrained
  report`` and ``predict-images`` print; torchmetrics' ``average="macro"`` would also average a class that is
  only predicted (never a label) as 0, so it is computed here from the confusion matrix instead.

The metrics are kept in a ``MetricCollection`` *without* compute groups: torchmetrics merges metrics whose states
are equal after the first update, and a first batch that is all right (or all wrong) in the top 5 made top-5 and
the mean per-class accuracy share one state, so top-5 silently reported the other's value.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix


class MeanPerClassAccuracy(MulticlassConfusionMatrix):
    """Mean over the classes present in the labels of each class's recall (``balanced_accuracy_score``)."""

    def compute(self) -> Tensor:
        counts = self.confmat.to(torch.float64)  # rows: true class, columns: predicted class
        support = counts.sum(dim=1)
        present = support > 0
        if not bool(present.any()):
            return torch.tensor(float("nan"))
        return (counts.diagonal()[present] / support[present]).mean().to(torch.float32)


def accuracy_metrics(num_classes: int, prefix: str = "") -> MetricCollection:
    """``{prefix}top1``, ``{prefix}mean_class_acc`` and, with 5 classes or more, ``{prefix}top5``."""
    metrics = {"top1": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
               "mean_class_acc": MeanPerClassAccuracy(num_classes)}
    if num_classes >= 5:
        metrics["top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return MetricCollection(metrics, prefix=prefix, compute_groups=False)
