"""Two-process DDP (gloo, CPU) gives the same test metrics as one process: no image counted twice."""
import csv
import glob
import os
import subprocess
import sys

import pytest

from tests.conftest import finegrained_command, make_image_folder


def _test_run(recipe, ckpt, runs_csv, extra):
    out = subprocess.run(finegrained_command() + ["test", "--config", recipe, "--ckpt_path", ckpt, "--runs_csv", runs_csv,
                                           "--trainer.accelerator", "cpu", "--trainer.limit_test_batches", "1.0"] + extra,
                         capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="gloo DDP test written for Linux")
def test_two_process_ddp_test_metrics_equal_one_process(trained_run, tmp_path):
    recipe, ckpt, _ = trained_run
    # 17 test images over 2 ranks: a padding sampler would give rank 1 a repeated image (18 counted).
    data = make_image_folder(tmp_path / "data", n_classes=3, per_class=6)
    os.remove(sorted(glob.glob(os.path.join(data, "test", "class_2", "*")))[0])
    extra = ["--data.init_args.root", data]
    matrices = os.path.join(os.path.dirname(recipe), "**", "confusion_matrix.csv")
    before = set(glob.glob(matrices, recursive=True))
    single = _test_run(recipe, ckpt, str(tmp_path / "one.csv"), extra + ["--trainer.devices", "1"])
    double = _test_run(recipe, ckpt, str(tmp_path / "two.csv"),
                       extra + ["--trainer.devices", "2", "--trainer.strategy", "ddp"])
    # The confusion matrices (synced over ranks) count every test image exactly once.
    written = sorted(set(glob.glob(matrices, recursive=True)) - before)
    assert len(written) == 2
    for path in written:
        counts = [[int(v) for v in row[1:]] for row in list(csv.reader(open(path)))[1:]]
        assert sum(map(sum, counts)) == 17, path
        assert [sum(row) for row in counts] == [6, 6, 5], path  # per true class: class_2 lost one image
    assert "Test accuracy on 17 images" in single  # printed from the confusion matrix, not len(dataset)
    line = lambda text: [l for l in text.splitlines() if l.startswith("Test accuracy on")]  # noqa: E731
    assert line(single) and line(single) == line(double)
    one, two = (list(csv.DictReader(open(tmp_path / f))) for f in ("one.csv", "two.csv"))
    assert len(one) == 1 and len(two) == 1  # rank 0 alone records the run
    for key in ("top1", "mean_class_acc"):
        assert float(one[0][key]) == float(two[0][key])


def _fit_metrics(recipe, data, out, extra):
    out_dir = str(out)
    result = subprocess.run(
        finegrained_command() + ["fit", "--config", recipe, "--data.init_args.root", data, "--model.lr", "0",
                                 "--data.init_args.val_fraction", "0.3", "--data.init_args.batch_size", "1", "--data.init_args.hflip", "false",
                                 "--data.init_args.train_crop", "center", "--trainer.limit_train_batches", "1.0",
                                 "--trainer.default_root_dir", out_dir, "--checkpoint.dirpath", out_dir + "/ckpt",
                                 "--runs_csv", out_dir + "/runs.csv", "--trainer.accelerator", "cpu"] + extra,
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "sync_dist=True" not in result.stderr  # Lightning's hint that an epoch value is one rank's
    [path] = glob.glob(os.path.join(out_dir, "**", "metrics.csv"), recursive=True)
    [row] = [r for r in csv.DictReader(open(path)) if r.get("train_loss_epoch")]
    return float(row["train_loss_epoch"]), float(row["train_top1"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="gloo DDP test written for Linux")
def test_two_process_ddp_training_metrics_cover_both_ranks(trained_run, tmp_path):
    # lr 0, batch 1, no flip, centre crop: every image's loss is the same in both runs, so the epoch's training
    # loss and top-1 must be the mean over all 12 training images (6 per rank, none padded), not over rank 0's 6.
    recipe, _, data = trained_run
    single = _fit_metrics(recipe, data, tmp_path / "one", ["--trainer.devices", "1"])
    double = _fit_metrics(recipe, data, tmp_path / "two", ["--trainer.devices", "2", "--trainer.strategy", "ddp"])
    assert double == pytest.approx(single, rel=1e-4, abs=1e-6)
