"""Kill `finegrained fit` mid-training (SIGTERM, SIGKILL), resume with --ckpt_path last: same result."""
import os
import signal
import subprocess
import time

import pytest
import torch

from tests.conftest import finegrained_command, make_image_folder, write_tiny_recipe


def _command(recipe, root, extra=()):
    return finegrained_command() + ["fit", "--config", recipe, "--trainer.max_epochs", "4", "--trainer.limit_train_batches", "1.0",
                   "--trainer.limit_val_batches", "1.0", "--trainer.deterministic", "true",
                   "--trainer.default_root_dir", str(root), "--checkpoint.dirpath", str(root / "ck")] + list(extra)


def _fit(command):
    """Run a fit to completion; on failure show its stderr, not just the exit status."""
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-4000:]}"


def _final(root):
    checkpoint = torch.load(root / "ck" / "last.ckpt", weights_only=True)
    return checkpoint["epoch"], checkpoint["state_dict"], checkpoint["callbacks"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    data = make_image_folder(tmp / "data", n_classes=3, per_class=12)
    recipe = write_tiny_recipe(str(tmp), data)
    reference = tmp / "reference"
    _fit(_command(recipe, reference))
    return tmp, recipe, _final(reference)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_kill_and_resume_equals_uninterrupted(setup, sig):
    tmp, recipe, (ref_epoch, ref_state, ref_callbacks) = setup
    root = tmp / f"killed_{sig.name}"
    proc = subprocess.Popen(_command(recipe, root), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (root / "ck" / "last.ckpt").exists():  # the end of epoch 0
        assert proc.poll() is None and time.time() < deadline, "fit ended before its first checkpoint"
        time.sleep(0.05)
    time.sleep(0.5)  # into epoch 1
    assert proc.poll() is None, "fit finished before it could be interrupted"
    proc.send_signal(sig)
    proc.wait(timeout=120)
    epoch, _, _ = _final(root)  # the file a kill left behind loads
    assert epoch < ref_epoch
    _fit(_command(recipe, root, ["--ckpt_path", "last"]))
    epoch, state, callbacks = _final(root)
    assert epoch == ref_epoch
    for name, tensor in ref_state.items():
        assert torch.equal(state[name], tensor), name
    best = [k for k in callbacks if k.startswith("ModelCheckpoint")][0]
    assert callbacks[best]["best_model_score"] == ref_callbacks[best]["best_model_score"]


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
