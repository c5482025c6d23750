"""The SVM test protocol: one-vs-all SVMs on image and flip features, `finegrained test --svm`, and its table rows."""
import pytest
import torch


def test_svm_protocol_trains_one_vs_all_on_image_and_flip_and_averages_test_scores():
    import numpy as np
    from sklearn.svm import LinearSVC

    from finegrained.svm import svm_accuracy

    g = torch.Generator().manual_seed(0)

    class Stub(torch.nn.Module):
        """A network whose features are the images: image i is (D, 1, 2), its two views side by side, so the
        horizontal flip of head_features gives the second view."""

        def forward_features(self, images):
            return images[..., 0].flatten(1)

    def data(n):
        labels = torch.arange(n) % 6
        x = torch.randn(n, 2, 8, generator=g) + torch.nn.functional.one_hot(labels, 8)[:, None].float() * 1.5
        return x, labels

    class Views(torch.utils.data.Dataset):
        def __init__(self, x, labels):
            self.x, self.labels = x, labels

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            return self.x[i].T[:, None, :], int(self.labels[i])  # (8, 1, 2)

    (train, train_labels), (test, test_labels) = data(60), data(30)
    result = svm_accuracy(Stub(), Views(train, train_labels), Views(test, test_labels))
    # head_features keeps features as float16 (memory): the reference starts from the same values.
    norm = lambda t: torch.nn.functional.normalize(t.half().float(), dim=-1).numpy()  # noqa: E731
    svm = LinearSVC(C=1.0, random_state=0).fit(norm(train.flatten(0, 1)), np.repeat(np.arange(60) % 6, 2))
    scores = (svm.decision_function(norm(test[:, 0])) + svm.decision_function(norm(test[:, 1]))) / 2
    assert result["top1"] == pytest.approx(float((scores.argmax(1) == np.arange(30) % 6).mean()))
    assert 0 <= result["mean_class_acc"] <= 1 and "top5" in result


def test_finegrained_test_svm_prints_and_records_both_classifiers(trained_run, tmp_path, capsys):
    import csv

    from finegrained.cli import main

    recipe, ckpt, _ = trained_run
    runs = tmp_path / "runs.csv"
    assert main(["test", "--config", recipe, "--ckpt_path", ckpt, "--svm", "true", "--runs_csv", str(runs)]) == 0
    printed = capsys.readouterr().out
    assert "Test accuracy on" in printed and "SVM accuracy on" in printed
    assert [row["classifier"] for row in csv.DictReader(open(runs))] == ["softmax", "svm"]


def test_svm_papers_are_compared_with_svm_runs_and_the_mixed_bcnn_row_is_marked(tmp_path):
    import os

    import pandas as pd

    from finegrained.results.runs import RUN_FIELDS
    from finegrained.results.tables import comparison, load_reference, write_tables

    reference = load_reference(os.path.join(os.path.dirname(__file__), "..", "results", "reference.csv"))
    rows = reference[(reference["table"] == "fgvc_comparison") & (reference["method"] == "bcnn")]
    assert set(rows["dim"]) == {"", "[D,D]"} and set(rows["classifier"]) == {"svm"}
    dd = rows[rows["dim"] == "[D,D]"].set_index("dataset")["value"].to_dict()
    assert dd == {"cub": 84.0, "aircraft": 84.1, "cars": 90.6}
    run = {f: "" for f in RUN_FIELDS}
    runs = pd.DataFrame([{**run, "recipe": "r", "dataset": "cars", "method": "bcnn", "backbone": "vgg16",
                          "head_dim": 262144, "top1": 0.90, "classifier": "softmax", "timestamp": "1"},
                         {**run, "recipe": "r", "dataset": "cars", "method": "bcnn", "backbone": "vgg16",
                          "head_dim": 262144, "top1": 0.91, "classifier": "svm", "timestamp": "2"}])
    ours = comparison(reference, runs, "fgvc_comparison").ours
    assert ours.loc[("bcnn", "vgg16", "[D,D]"), "cars"] == pytest.approx(91.0)  # the SVM run, not the softmax one
    write_tables(reference, runs, str(tmp_path))
    text = open(tmp_path / "fgvc_comparison.md").read()
    assert "| B-CNN†" in text and "asymmetric [D,M]" in text
