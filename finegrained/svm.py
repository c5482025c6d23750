"""The SVM test protocol of B-CNN (MatConvNet code), HIHCA and the MPN-COV ICCV'17 paper.

One-vs-all linear SVMs (scikit-learn's ``LinearSVC``, C = 1) on l2-normalised head features of the training
images and their horizontal flips; a test image's class scores are the mean of those of the image and its
flip. :func:`svm_accuracy` returns top-1, top-5 and mean per-class accuracy, to report beside the softmax
classifier's (``finegrained test --svm``).

Memory: scikit-learn's liblinear works in float64, N × 2 × D × 8 bytes for N training images (B-CNN's
262,144-d features of CUB's 5,994 images: about 25 GB).
"""
from __future__ import annotations

from typing import Dict

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from finegrained.features import head_features


def _normalised(features: torch.Tensor) -> np.ndarray:
    return F.normalize(features.float(), dim=-1).numpy()


def svm_accuracy(network, train: Dataset, test: Dataset, batch_size: int = 32, num_workers: int = 0,
                 c: float = 1.0, seed: int = 0, device="cpu") -> Dict[str, float]:
    """Train the SVMs on ``train`` (un-augmented images) and evaluate on ``test``; ``network`` (a
    :class:`~finegrained.network.FineGrainedNetwork`) gives the features (:func:`finegrained.features.head_features`)."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score
    from sklearn.svm import LinearSVC

    def features(dataset):
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        return head_features(network, loader, device, flip=True)  # (N, 2, D), (N,)

    x, y = features(train)
    svm = LinearSVC(C=c, random_state=seed).fit(_normalised(x.flatten(0, 1)), y.repeat_interleave(2).numpy())
    x_test, y_test = features(test)
    scores = np.mean([svm.decision_function(_normalised(x_test[:, view])) for view in range(2)], axis=0)
    predicted = svm.classes_[scores.argmax(1)]
    truth = y_test.numpy()
    result = {"top1": float(accuracy_score(truth, predicted)),
              "mean_class_acc": float(balanced_accuracy_score(truth, predicted))}
    if scores.shape[1] >= 5:
        top5 = svm.classes_[np.argsort(-scores, axis=1)[:, :5]]
        result["top5"] = float((top5 == truth[:, None]).any(1).mean())
    return result
