"""Kill `finegrained fit` mid-training (SIGTERM, SIGKILL), resume with --ckpt_path last: same result."""
import json
import os
import signal
import subprocess

import pytest
import torch

from finegrained.cli import main
from tests.conftest import (REPO_ROOT, SUBPROCESS_ENV, callback_args, finegrained_command, make_image_folder,
                            printed_by, write_tiny_recipe)

BACKBONE = "mobilenet_v2"  # with batch norm, whose running statistics a resume must restore too


def _command(recipe, root, extra=()):
    """The arguments of ``finegrained`` for a deterministic 4-epoch fit into ``root``."""
    return ["fit", "--config", recipe, "--trainer.max_epochs", "4", "--trainer.limit_train_batches", "1.0",
            "--trainer.limit_val_batches", "1.0", "--trainer.deterministic", "true",
            "--trainer.default_root_dir", str(root), "--checkpoint.dirpath", str(root / "ck")] + list(extra)


def _fit(args):
    """A fit that is not killed, run to completion in this process with one thread, as the killed fits run
    (:data:`SUBPROCESS_ENV`): their results are compared bit for bit. The global flags a deterministic fit sets are
    put back."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(1)
    try:
        assert main(list(args)) == 0
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def _started(path):
    """Where a fit run with :class:`tests.ddp_helpers.RecordStart` started: (epoch, global step)."""
    with open(path) as f:
        start = json.load(f)
    return start["epoch"], start["global_step"]


def _final(root):
    checkpoint = torch.load(root / "ck" / "last.ckpt", weights_only=True)
    return checkpoint["epoch"], checkpoint["state_dict"], checkpoint["callbacks"], checkpoint["global_step"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    data = make_image_folder(tmp / "data", n_classes=3, per_class=6)
    recipe = write_tiny_recipe(str(tmp), data, BACKBONE)
    reference = tmp / "reference"
    _fit(_command(recipe, reference))
    return tmp, recipe, _final(reference)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_kill_and_resume_equals_uninterrupted(setup, sig):
    """The signal comes in the second step of epoch 1, after epoch 0's checkpoint, at the same point in every run."""
    tmp, recipe, (ref_epoch, ref_state, ref_callbacks, ref_steps) = setup
    root = tmp / f"killed_{sig}"
    steps_per_epoch = ref_steps // (ref_epoch + 1)
    killed = subprocess.run(finegrained_command() + _command(recipe, root,
                                                             callback_args("KillAt", step=steps_per_epoch + 1,
                                                                           signal=sig)),
                            capture_output=True, text=True, timeout=600, cwd=REPO_ROOT, env=SUBPROCESS_ENV)
    # SIGKILL: no handler runs; SIGTERM: Lightning stops the fit, and the status says it was stopped.
    assert killed.returncode == (-9 if sig == "SIGKILL" else 128 + 15), killed.stderr[-3000:]
    if sig == "SIGTERM":
        stopped = [line for line in killed.stderr.splitlines() if line.startswith("finegrained fit: stopped")]
        assert stopped == ["finegrained fit: stopped by SIGTERM before the end; continue with --ckpt_path last"]
    epoch, _, _, steps = _final(root)  # the file a kill left behind loads
    assert epoch < ref_epoch and steps > 0
    # Both ways to name the checkpoint: Lightning reads the hyper-parameters of a path, not of "last"
    ckpt = "last" if sig == "SIGTERM" else str(root / "ck" / "last.ckpt")
    _fit(_command(recipe, root, ["--ckpt_path", ckpt] + callback_args("RecordStart", path=str(root / "start.json"))))
    assert _started(root / "start.json")[1] == steps  # continued from the kill's checkpoint, not from scratch
    epoch, state, callbacks, _ = _final(root)
    assert epoch == ref_epoch
    for name, tensor in ref_state.items():
        assert torch.equal(state[name], tensor), name
    best = [k for k in callbacks if k.startswith("ModelCheckpoint")][0]
    assert callbacks[best]["best_model_score"] == ref_callbacks[best]["best_model_score"]
    # The resumed fit's record of what it changed from the recipe: its callbacks only, not the model settings that
    # Lightning took from the checkpoint (class names, preprocessing), which would split it from its seeds' table row
    overrides = callbacks[next(k for k in callbacks if k.startswith("RunArtifacts"))]["overrides"]
    assert "trainer.callbacks" in overrides and not [key for key in overrides if key.startswith("model.")], overrides


def test_checkpoint_writes_are_atomic(tmp_path):
    from finegrained.resume import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, target)
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt"]  # no temporary left behind
    calls = []
    original = os.replace
    try:
        os.replace = lambda src, dst: calls.append((src, dst)) or original(src, dst)
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, target)
    finally:
        os.replace = original
    assert calls and calls[0][1] == str(target) and calls[0][0] != str(target)
    assert torch.equal(torch.load(target, weights_only=True)["state_dict"]["w"], torch.zeros(3))


# ---- last.ckpt is the last epoch, whatever the monitored metric does ---------------------------------------
def _runs(path):
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))


def _fit_until_killed(args):
    done = subprocess.run(finegrained_command() + ["fit"] + list(args), capture_output=True, text=True, timeout=600,
                          cwd=REPO_ROOT, env=SUBPROCESS_ENV)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]


def test_last_checkpoint_is_the_last_epoch_when_validation_plateaus(tmp_path, capsys):
    from finegrained.resume import completed_epochs

    data = make_image_folder(tmp_path / "data", n_classes=3, per_class=6)
    recipe = write_tiny_recipe(str(tmp_path), data, BACKBONE)
    ck = tmp_path / "run" / "checkpoints"
    printed_by(["fit", "--config", recipe, "--trainer.max_epochs", "3", "--checkpoint.monitor", "plateau"]
                + callback_args("LogConstant"), capsys)
    last, best = (torch.load(ck / name, weights_only=True) for name in ("last.ckpt", "best.ckpt"))
    assert completed_epochs(last) == 3 and last["global_step"] == 3 * 2  # limit_train_batches 2
    assert completed_epochs(best) == 1  # the metric never improved after the first epoch
    out = printed_by(["test", "--config", recipe, "--ckpt_path", str(ck / "last.ckpt")], capsys)
    assert "Checkpoint: last epoch; validation: held-out" in out
    out = printed_by(["test", "--config", recipe, "--ckpt_path", str(ck / "best.ckpt")], capsys)
    assert "Checkpoint: best plateau; validation: held-out" in out
    last_row, best_row = _runs(tmp_path / "run" / "runs.csv")
    assert (last_row["epochs"], last_row["selection"]) == ("3", "last epoch")
    assert (best_row["epochs"], best_row["selection"]) == ("1", "best plateau")


def test_a_fit_killed_after_two_epochs_leaves_their_last_checkpoint_and_resumes(tmp_path, capsys):
    """Validation on the test set (the published protocol): no best.ckpt, last.ckpt after every epoch."""
    from finegrained.resume import completed_epochs

    data = make_image_folder(tmp_path / "data", n_classes=3, per_class=4, splits=("train", "val"))
    recipe = write_tiny_recipe(str(tmp_path), data, BACKBONE)
    ck = tmp_path / "run" / "checkpoints"
    _fit_until_killed(["--config", recipe, "--trainer.max_epochs", "3"] + callback_args("KillAt", epoch=2))
    assert sorted(os.listdir(ck)) == ["last.ckpt"]  # no best.ckpt (chosen on the test set), no temporary file
    assert completed_epochs(torch.load(ck / "last.ckpt", weights_only=True)) == 2
    out = printed_by(["test", "--config", recipe, "--ckpt_path", str(ck / "last.ckpt")], capsys)
    assert "Checkpoint: epoch 2 of 3; validation: test set" in out
    printed_by(["fit", "--config", recipe, "--trainer.max_epochs", "3", "--ckpt_path", "last"]
                + callback_args("RecordStart", path=str(tmp_path / "start.json")), capsys)
    assert _started(tmp_path / "start.json")[0] == 2
    assert completed_epochs(torch.load(ck / "last.ckpt", weights_only=True)) == 3
    out = printed_by(["test", "--config", recipe, "--ckpt_path", str(ck / "last.ckpt")], capsys)
    assert "Checkpoint: last epoch; validation: test set" in out
    assert [(row["epochs"], row["selection"]) for row in _runs(tmp_path / "run" / "runs.csv")] == [
        ("2", "epoch 2 of 3"), ("3", "last epoch")]


def test_every_n_train_steps_writes_last_inside_the_epoch(tmp_path):
    from finegrained.resume import completed_epochs

    data = make_image_folder(tmp_path / "data", n_classes=3, per_class=4, splits=("train", "val"))
    recipe = write_tiny_recipe(str(tmp_path), data, BACKBONE)
    ck = tmp_path / "run" / "checkpoints"
    _fit_until_killed(["--config", recipe, "--trainer.max_epochs", "3", "--checkpoint.every_n_train_steps", "1"]
                      + callback_args("KillAt", step=3))  # 2 steps per epoch: killed inside the second epoch
    checkpoint = torch.load(ck / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 3 and completed_epochs(checkpoint) == 1
    assert sorted(os.listdir(ck)) == ["last.ckpt"]


# ---- the files a write leaves ------------------------------------------------------------------------------
_FULL_DISK = r"""
import os, resource, signal, sys, torch
from finegrained.resume import AtomicCheckpointIO
target = sys.argv[1]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
try:
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.randn(500_000)}}, target)
except OSError as err:
    print("failed:", err.errno)
"""


def test_a_failed_write_leaves_no_partial_file_and_the_previous_checkpoint(tmp_path):
    import sys

    from finegrained.resume import AtomicCheckpointIO

    ck, scratch = tmp_path / "ck", tmp_path / "tmpdir"
    scratch.mkdir()
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}}, ck / "last.ckpt")
    done = subprocess.run([sys.executable, "-c", _FULL_DISK, str(ck / "last.ckpt")], capture_output=True, text=True,
                          env={**os.environ, "TMPDIR": str(scratch), "PYTHONPATH": REPO_ROOT}, timeout=120)
    assert "failed: 27" in done.stdout, done.stderr  # EFBIG, as a full disk gives ENOSPC
    assert sorted(os.listdir(ck)) == ["last.ckpt"] and os.listdir(scratch) == []
    assert torch.equal(torch.load(ck / "last.ckpt", weights_only=True)["state_dict"]["w"], torch.ones(3))


def test_writes_use_no_temporary_folder_and_remove_what_a_killed_write_left(tmp_path, monkeypatch):
    import socket
    import tempfile

    from finegrained.resume import AtomicCheckpointIO

    made = []
    original = tempfile.mkstemp
    monkeypatch.setattr(tempfile, "mkstemp", lambda *a, **k: made.append(a or k) or original(*a, **k))
    target = tmp_path / "last.ckpt"
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f"last.ckpt.tmp-{socket.gethostname()}-{dead.pid}"
    alive = tmp_path / f"last.ckpt.tmp-{socket.gethostname()}-1"  # pid 1 runs: maybe a write in progress
    users = tmp_path / "last.ckpt.tmp-mine"  # not a name this tool writes
    for path in (stale, alive, users):
        path.write_bytes(b"partial")
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}}, target)
    assert made == []  # nothing written to $TMPDIR (a kill there would leave it behind)
    assert sorted(os.listdir(tmp_path)) == sorted(["last.ckpt", alive.name, users.name])


@pytest.mark.parametrize("resume_after", [0, 1])
def test_a_two_stage_fit_resumed_in_stage_1_or_at_the_switch_equals_the_uninterrupted_one(setup, resume_after):
    """The frozen route's schedule, weight decay and the backbone's fresh optimiser state at stage 2 come back
    exactly from a checkpoint (Lightning's BaseFinetuning would otherwise put back its first epoch's learning
    rates)."""
    tmp, recipe, _ = setup
    two_stage = ["--stage1.epochs", "2", "--stage1.lr", "0.05", "--stage1.weight_decay", "0.001",
                 "--checkpoint.save_top_k", "-1", "--checkpoint.monitor", "null", "--checkpoint.filename", "{epoch}"]
    reference = tmp / "two_stage_reference"
    if not (reference / "ck" / "last.ckpt").exists():
        _fit(_command(recipe, reference, two_stage))
    resumed = tmp / f"two_stage_resumed_{resume_after}"
    start = reference / "ck" / f"epoch={resume_after}.ckpt"
    _fit(_command(recipe, resumed, two_stage + ["--ckpt_path", str(start)]
                  + callback_args("RecordStart", path=str(tmp / f"start_{resume_after}.json"))))
    assert _started(tmp / f"start_{resume_after}.json") == (
        resume_after + 1, torch.load(start, weights_only=True)["global_step"])
    ref_epoch, ref_state, _, _ = _final(reference)
    epoch, state, _, _ = _final(resumed)
    assert epoch == ref_epoch == 3
    for name, tensor in ref_state.items():
        assert torch.equal(state[name], tensor), name
    first = torch.load(reference / "ck" / "epoch=0.ckpt", weights_only=True)
    lrs = [group["lr"] for group in first["optimizer_states"][0]["param_groups"]]
    assert lrs[0] == 0.0 and all(lr == pytest.approx(0.05) for lr in lrs[1:]), lrs  # stage 1: the backbone at 0
