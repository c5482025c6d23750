"""Which checkpoint `finegrained test` uses and reports (best on held-out validation or last), and what fit keeps."""
import os

import pytest

from finegrained.cli import main
from tests.conftest import printed_by


@pytest.mark.parametrize("val_fraction, best_written, validation", [(0.0, False, "test set"), (0.5, True, "held-out")])
def test_checkpoint_choice_is_honest(val_fraction, best_written, validation, trained_run, tmp_path, capsys):
    import csv

    from tests.replicas import write_cub

    recipe, _, _ = trained_run
    cub = write_cub(str(tmp_path / "cub"), n_classes=3, per_class=4)
    run = ["--config", recipe, "--data", "datamodules.CUB200DataModule", "--data.init_args.root", cub,
           "--data.init_args.val_fraction", str(val_fraction), "--data.init_args.batch_size", "2",
           "--data.init_args.resize_size", "72", "--data.init_args.crop_size", "64", "--data.init_args.num_workers", "0",
           "--trainer.default_root_dir", str(tmp_path), "--checkpoint.dirpath", str(tmp_path / "ck"),
           "--runs_csv", str(tmp_path / "runs.csv")]
    assert main(["fit", *run, "--trainer.max_epochs", "2"]) == 0
    assert (tmp_path / "ck" / "best.ckpt").exists() == best_written
    ckpt = tmp_path / "ck" / ("best.ckpt" if best_written else "last.ckpt")
    printed = printed_by(["test", *run, "--ckpt_path", str(ckpt)], capsys)
    selection = "best val_top1" if best_written else "last epoch"
    assert f"Checkpoint: {selection}; validation: {validation}" in printed
    (row,) = list(csv.DictReader(open(tmp_path / "runs.csv")))
    assert row["validation"] == validation and row["selection"] == selection


def test_fast_dev_run_leaves_an_existing_last_checkpoint_alone(trained_run, tmp_path):
    recipe, _, _ = trained_run
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "last.ckpt").write_bytes(b"a real run's checkpoint")
    assert main(["fit", "--config", recipe, "--trainer.fast_dev_run", "1", "--trainer.default_root_dir", str(tmp_path),
                 "--checkpoint.dirpath", str(ck)]) == 0
    assert (ck / "last.ckpt").read_bytes() == b"a real run's checkpoint"
    assert sorted(os.listdir(ck)) == ["last.ckpt"]
