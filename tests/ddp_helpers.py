"""Callbacks that the subprocess tests pass to the CLI (``trainer.callbacks``): what every rank holds, and a kill at a
chosen point of a fit."""
import json
import os
import signal as signal_module
import time

import pytorch_lightning as pl
import torch


class SaveHeadPerRank(pl.Callback):
    """Writes ``<folder>/rank<R>.pt``: the head's state dict of every process at the end of the fit, and
    ``<folder>/classifier_rank<R>.pt`` the classifier's at the start of training (after a cached stage 1)."""

    def __init__(self, folder: str):
        self.folder = folder

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            os.makedirs(self.folder, exist_ok=True)
            state = {k: v.detach().cpu() for k, v in pl_module.classifier.state_dict().items()}
            torch.save(state, os.path.join(self.folder, f"classifier_rank{trainer.global_rank}.pt"))

    def on_train_end(self, trainer, pl_module):
        os.makedirs(self.folder, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in pl_module.head.state_dict().items()}
        torch.save(state, os.path.join(self.folder, f"rank{trainer.global_rank}.pt"))


class SaveReadIndicesPerRank(pl.Callback):
    """Writes ``<folder>/epoch<E>_rank<R>.pt``: the sample indices the rank's training loader read in each epoch
    (ShardDataModule's sampler; Lightning sets its epoch)."""

    def __init__(self, folder: str):
        self.folder = folder

    def on_train_epoch_end(self, trainer, pl_module):
        os.makedirs(self.folder, exist_ok=True)
        sampler = trainer.train_dataloader.sampler
        torch.save([i for batch in sampler for i in batch],
                   os.path.join(self.folder, f"epoch{trainer.current_epoch}_rank{trainer.global_rank}.pt"))


class SaveBatchesPerRank(pl.Callback):
    """Writes ``<folder>/rank<R>.pt``: ``(epoch, batch index, labels, image sums, loss)`` of every training batch the
    rank trained on, in order (the sums tell the samples apart when the transforms are deterministic)."""

    def __init__(self, folder: str):
        self.folder = folder
        self.batches = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        images, labels = batch
        sums = [float(s) for s in images.double().sum(dim=(1, 2, 3))]
        self.batches.append((trainer.current_epoch, batch_idx, labels.tolist(), sums, float(outputs["loss"])))

    def on_train_end(self, trainer, pl_module):
        os.makedirs(self.folder, exist_ok=True)
        torch.save(self.batches, os.path.join(self.folder, f"rank{trainer.global_rank}.pt"))


class KillAt(pl.Callback):
    """Sends ``signal`` (SIGKILL by default) to its own process at the start of training epoch ``epoch``, or after the
    training step that reaches ``step`` (the same point in every run, unlike a timer)."""

    def __init__(self, epoch: int = -1, step: int = -1, signal: str = "SIGKILL"):
        self.epoch, self.step, self.signal = epoch, step, getattr(signal_module, signal)

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), self.signal)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.step >= 0 and trainer.global_step == self.step:  # steps 0 .. step-1 done, their checkpoints written
            os.kill(os.getpid(), self.signal)


class LogConstant(pl.Callback):
    """Logs ``name`` = ``value`` after every validation: a validation metric that never improves."""

    def __init__(self, name: str = "plateau", value: float = 1.0):
        self.name, self.value = name, value

    def on_validation_epoch_end(self, trainer, pl_module):
        pl_module.log(self.name, self.value)


class RecordStart(pl.Callback):
    """Write where training starts in this process (``{"epoch": .., "global_step": ..}``) to ``path``: a resumed fit
    must start where its checkpoint ended, not from scratch."""

    def __init__(self, path: str):
        self.path = path

    def on_train_start(self, trainer, pl_module):
        with open(self.path, "w") as f:
            json.dump({"epoch": trainer.current_epoch, "global_step": trainer.global_step}, f)


class PauseOnFirstStart(pl.Callback):
    """At the start of training epoch ``epoch``, in a job's first start only (``SLURM_RESTART_COUNT`` unset or 0),
    writes ``marker`` and waits (up to ``timeout_s``) until the process is told to stop: the moment a test requeues
    the job, with the previous epoch's ``last.ckpt`` on disk."""

    def __init__(self, marker: str, epoch: int = 1, timeout_s: float = 120.0):
        self.marker, self.epoch, self.timeout_s = marker, epoch, timeout_s

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch != self.epoch or os.environ.get("SLURM_RESTART_COUNT", "0") not in ("", "0"):
            return
        with open(self.marker, "w") as f:
            f.write(os.environ.get("SLURM_JOB_ID", ""))
        deadline = time.monotonic() + self.timeout_s
        while not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.1)
