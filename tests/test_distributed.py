"""Two-process DDP (gloo, CPU) gives the same test metrics as one process: no image counted twice."""
import csv
import glob
import os
import sys

import pytest

from tests.conftest import callback_args, make_image_folder, printed_by, run_finegrained


def _test_args(recipe, ckpt, runs_csv, extra):
    return ["test", "--config", recipe, "--ckpt_path", ckpt, "--runs_csv", runs_csv, "--trainer.accelerator", "cpu",
            "--trainer.limit_test_batches", "1.0"] + extra


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="gloo DDP test written for Linux")
def test_two_process_ddp_test_metrics_equal_one_process(trained_run, tmp_path, capsys):
    recipe, ckpt, _ = trained_run
    # 17 test images over 2 ranks: a padding sampler would give rank 1 a repeated image (18 counted).
    data = make_image_folder(tmp_path / "data", n_classes=3, per_class=6)
    os.remove(sorted(glob.glob(os.path.join(data, "test", "class_2", "*")))[0])
    extra = ["--data.init_args.root", data]
    matrices = os.path.join(os.path.dirname(recipe), "**", "confusion_matrix.csv")
    before = set(glob.glob(matrices, recursive=True))
    single = printed_by(_test_args(recipe, ckpt, str(tmp_path / "one.csv"), extra + ["--trainer.devices", "1"]),
                        capsys)
    double = run_finegrained(_test_args(recipe, ckpt, str(tmp_path / "two.csv"),
                                        extra + ["--trainer.devices", "2", "--trainer.strategy", "ddp"])).stdout
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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="gloo DDP test written for Linux")
def test_two_process_ddp_training_metrics_cover_both_ranks(trained_run, tmp_path):
    # The epoch's training loss must be the mean over both ranks' batches (12 images, 3 batches of 2 on each
    # rank), not over rank 0's; Lightning warns when an epoch value is logged without syncing. MobileNet-V2: the
    # backbone does not matter here, and its checkpoints are a third of ResNet-18's.
    import torch

    recipe, _, data = trained_run
    out = str(tmp_path)
    result = run_finegrained(["fit", "--config", recipe, "--model.backbone", "mobilenet_v2",
                              "--data.init_args.root", data,
                              "--data.init_args.val_fraction", "0.3", "--data.init_args.batch_size", "2",
                              "--trainer.limit_train_batches", "1.0", *callback_args("SaveBatchesPerRank", folder=out),
                              "--trainer.default_root_dir", out, "--checkpoint.dirpath", out + "/ckpt",
                              "--runs_csv", out + "/runs.csv", "--trainer.accelerator", "cpu",
                              "--trainer.devices", "2", "--trainer.strategy", "ddp"])
    assert "sync_dist=True" not in result.stderr
    losses = [[batch[4] for batch in torch.load(os.path.join(out, f"rank{r}.pt"))] for r in (0, 1)]
    assert [len(l) for l in losses] == [3, 3]
    [path] = glob.glob(os.path.join(out, "**", "metrics.csv"), recursive=True)
    [row] = [r for r in csv.DictReader(open(path)) if r.get("train_loss_epoch")]
    everyone = sum(losses[0] + losses[1]) / 6
    assert float(row["train_loss_epoch"]) == pytest.approx(everyone, rel=1e-5)
    assert abs(sum(losses[0]) / 3 - everyone) > 1e-4  # rank 0's mean alone would differ: the test can fail
