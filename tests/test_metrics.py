"""The accuracies the tool prints and records, recomputed with scikit-learn from the logits, on batch orders
chosen to break them (a first batch all right or all wrong in the top 5, labels sorted by class, a class that is
predicted but never a label)."""
import csv
import os
import zlib

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, top_k_accuracy_score

from finegrained.metrics import accuracy_metrics
from tests.conftest import printed_by, run_finegrained, write_image, write_tiny_recipe


def sklearn_accuracies(logits: np.ndarray, labels: np.ndarray) -> dict:
    k = logits.shape[1]
    expected = {"top1": accuracy_score(labels, logits.argmax(1)),
                "mean_class_acc": balanced_accuracy_score(labels, logits.argmax(1))}
    if k >= 5:
        expected["top5"] = top_k_accuracy_score(labels, logits, k=5, labels=np.arange(k))
    return expected


def collection_accuracies(batches) -> dict:
    metrics = accuracy_metrics(batches[0][0].shape[1])
    for logits, labels in batches:
        metrics.update(torch.as_tensor(logits), torch.as_tensor(labels))
    return {k: float(v) for k, v in metrics.compute().items()}


def _batches(kind, k=6, n=24, batch=4, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.sort(rng.integers(0, k, n)) if kind != "shuffled" else rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)).astype(np.float32)
    if kind == "first_batch_all_right":   # the first batch's labels are their top-1 (so also top-5)
        logits[np.arange(batch), labels[:batch]] += 10
    if kind == "first_batch_all_wrong":   # the first batch's labels are their lowest logit (outside the top 5)
        logits[np.arange(batch), labels[:batch]] -= 10
    return [(logits[i:i + batch], labels[i:i + batch]) for i in range(0, n, batch)]


@pytest.mark.parametrize("kind", ["first_batch_all_right", "first_batch_all_wrong", "sorted", "shuffled"])
@pytest.mark.parametrize("k", [3, 6, 10])
def test_accumulated_metrics_equal_sklearn(kind, k):
    batches = _batches(kind, k=k)
    logits, labels = np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])
    expected = sklearn_accuracies(logits, labels)
    got = collection_accuracies(batches)
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1e-6), (key, got, expected)


def test_the_compute_group_trap_is_avoided():
    """The case that merged top-5 with the mean per-class accuracy: true top-5 0.5, mean per-class 0.4167."""
    eye = np.eye(6, dtype=np.float32) * 10
    batches = [(eye[:3], np.array([0, 1, 2])), (np.tile(np.arange(6, dtype=np.float32), (3, 1)), np.array([0, 0, 0]))]
    got = collection_accuracies(batches)
    assert got["top5"] == pytest.approx(0.5) and got["mean_class_acc"] == pytest.approx((0.25 + 1 + 1) / 3)


def test_a_class_only_predicted_does_not_count_in_the_mean_per_class_accuracy():
    logits = np.eye(4, dtype=np.float32)[[0, 2, 1, 1]]
    labels = np.array([0, 0, 1, 1])
    assert collection_accuracies([(logits, labels)])["mean_class_acc"] == pytest.approx(0.75)
    assert balanced_accuracy_score(labels, logits.argmax(1)) == pytest.approx(0.75)


def test_all_right_and_all_wrong_sets():
    right = np.eye(6, dtype=np.float32)[np.repeat(np.arange(6), 2)] * 5
    labels = np.repeat(np.arange(6), 2)
    assert collection_accuracies([(right, labels)]) == {"top1": 1.0, "mean_class_acc": 1.0, "top5": 1.0}
    wrong = -right  # every label is its image's lowest logit
    assert collection_accuracies([(wrong, labels)]) == {"top1": 0.0, "mean_class_acc": 0.0, "top5": 0.0}


# The tiny recipe of conftest, with a pretrained backbone and three epochs, so that the first test batch is right.
SIX_CLASS_SETTINGS = ["--trainer.max_epochs", "3", "--trainer.limit_train_batches", "1.0", "--trainer.limit_val_batches",
                      "1.0", "--trainer.limit_test_batches", "1.0", "--model.backbone", "efficientnet_lite0",
                      "--model.backbone_weights", "imagenet", "--model.head_kwargs", "{reduction: 8}",
                      "--model.optim.lr_mult", "{backbone: 1.0, head: 10.0, classifier: 10.0}",
                      "--data.init_args.resize_size", "40", "--data.init_args.crop_size", "32"]


SIX_COLOURS = [(230, 30, 30), (30, 200, 30), (30, 40, 230), (240, 220, 20), (170, 30, 210), (20, 210, 220)]


def six_colour_folder(root, per_class=4):
    """Six classes of distinct colours, so that a short fit gets the first test batch (one class) all right."""
    for split in ("train", "val", "test"):
        for c, colour in enumerate(SIX_COLOURS):
            for i in range(per_class):
                write_image(os.path.join(root, split, f"class_{c}", f"{i:03d}.png"), colour, size=40,
                            seed=zlib.crc32(f"{split}/{c}/{i}".encode()))
    return str(root)


def _logits_of(checkpoint, loader):
    from finegrained.model import load_classifier

    model = load_classifier(checkpoint)
    logits, labels = [], []
    with torch.no_grad():
        for images, targets in loader:
            # Each image and its flip through the plain network, averaged here (test_flip), not predict_logits.
            logits.append(((model(images) + model(torch.flip(images, dims=[3]))) / 2).numpy())
            labels.append(targets.numpy())
    return np.concatenate(logits), np.concatenate(labels)


def test_printed_recorded_and_logged_accuracies_equal_sklearn_on_the_saved_logits(tmp_path, capsys):
    """Six classes, test images sorted by class (as CUB's list is), so the first test batch is one class."""
    from datamodules import ImageFolderDataModule

    data = six_colour_folder(tmp_path / "data")
    recipe = write_tiny_recipe(str(tmp_path), data)
    run_finegrained(["fit", "--config", recipe] + SIX_CLASS_SETTINGS)
    checkpoint = str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    out = printed_by(["test", "--config", recipe, "--ckpt_path", checkpoint] + SIX_CLASS_SETTINGS, capsys)

    dm = ImageFolderDataModule(data, batch_size=4, num_workers=0, resize_size=40, crop_size=32)
    dm.setup()
    assert dm.test_dataset.targets == sorted(dm.test_dataset.targets)
    logits, labels = _logits_of(checkpoint, dm.test_dataloader())
    # The trap's trigger: the first batch (4 images of class 0) is all right in the top 5 (here also the top 1).
    assert (logits[:4].argmax(1) == 0).all()
    expected = sklearn_accuracies(logits, labels)
    line = next(line for line in out.splitlines() if line.startswith("Test accuracy on"))
    assert line == (f"Test accuracy on {len(labels)} images: top-1 {expected['top1']:.4f}, "
                    f"top-5 {expected['top5']:.4f}, mean per-class {expected['mean_class_acc']:.4f}")
    with open(tmp_path / "run" / "runs.csv") as f:
        record = list(csv.DictReader(f))[-1]
    for key in ("top1", "top5", "mean_class_acc"):
        assert float(record[key]) == pytest.approx(expected[key], abs=1e-6), key

    # The validation numbers logged in the (only) epoch are those of the same weights on the val split.
    val_logits, val_labels = _logits_of(checkpoint, dm.val_dataloader())
    expected_val = sklearn_accuracies(val_logits, val_labels)
    metrics_csv = os.path.join(tmp_path, "run", "lightning_logs", "version_0", "metrics.csv")
    with open(metrics_csv) as f:
        logged = [row for row in csv.DictReader(f) if row.get("val_top1")][-1]
    for key in ("top1", "top5", "mean_class_acc"):
        assert float(logged[f"val_{key}"]) == pytest.approx(expected_val[key], abs=1e-6), key
