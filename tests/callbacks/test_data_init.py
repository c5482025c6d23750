"""Data-dependent head initialisation in fit: k-means NetVLAD centres, skipped from a checkpoint, equal on all ranks."""
import pytest
import torch


def _fit_netvlad(recipe, tmp_path, *extra):
    from finegrained.cli import main

    run = ["--config", recipe, "--model.head", "netvlad", "--model.head_kwargs", '{"clusters": 8}', "--model.optim.lr", "0",
           "--trainer.default_root_dir", str(tmp_path), "--checkpoint.dirpath", str(tmp_path / "ck"), "--runs_csv", ""]
    assert main(["fit", *run, *extra]) == 0
    return torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)["state_dict"]


def test_fit_initialises_netvlad_centroids_by_kmeans(trained_run, tmp_path, caplog):
    """Backbone features after ReLU are non-negative, so k-means centres are; the random init is not."""
    import logging

    recipe, _, _ = trained_run
    caplog.set_level(logging.INFO)
    state = _fit_netvlad(recipe, tmp_path, "--trainer.max_epochs", "1")
    centroids = state["network.head.centroids"]
    assert (centroids >= -1e-6).all(), "centroids are not k-means centres of post-ReLU descriptors"
    assert any("k-means (8 centres)" in r.getMessage() for r in caplog.records)
    weight = state["network.head.assign.weight"].flatten(1)  # w_k = 2α c_k: tied to the centroids by one positive factor
    factor = (weight * centroids).sum() / centroids.square().sum()
    assert factor > 0 and torch.allclose(weight, factor * centroids, atol=1e-5)


def test_data_init_is_skipped_when_resuming_or_starting_from_a_checkpoint(trained_run, tmp_path, caplog):
    import logging

    recipe, _, _ = trained_run
    first = _fit_netvlad(recipe, tmp_path / "a", "--trainer.max_epochs", "1")
    caplog.set_level(logging.INFO)
    resumed = _fit_netvlad(recipe, tmp_path / "a", "--trainer.max_epochs", "2", "--ckpt_path",
                           str(tmp_path / "a" / "ck" / "last.ckpt"), "--data_init.seed", "5")
    started = _fit_netvlad(recipe, tmp_path / "b", "--trainer.max_epochs", "1", "--model.init_from",
                           str(tmp_path / "a" / "ck" / "last.ckpt"), "--data_init.seed", "5")
    for state in (resumed, started):
        torch.testing.assert_close(state["network.head.centroids"], first["network.head.centroids"])  # lr 0: nothing moves
    skipped = [r.getMessage() for r in caplog.records if "data-dependent initialisation skipped" in r.getMessage()]
    assert len(skipped) == 2


def test_data_init_is_identical_on_every_ddp_rank(trained_run, tmp_path):
    import sys

    from tests.conftest import callback_args, run_finegrained

    if not sys.platform.startswith("linux"):
        pytest.skip("gloo DDP test written for Linux")
    recipe, _, _ = trained_run
    run_finegrained([
        "fit", "--config", recipe, *callback_args("SaveHeadPerRank", folder=str(tmp_path / "heads")),
        "--model.backbone", "mobilenet_v2", "--model.head", "netvlad", "--model.head_kwargs",
        '{"clusters": 8}', "--model.optim.lr", "0.01", "--trainer.max_epochs", "1", "--trainer.strategy", "ddp",
        "--trainer.devices", "2", "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path),
        "--checkpoint.dirpath", str(tmp_path / "ck")])
    rank0, rank1 = (torch.load(tmp_path / "heads" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for key in rank0:
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0)
    assert (rank0["centroids"] >= -0.05).all()  # k-means centres (moved little by one epoch at lr 0.01)
