"""Exact resume: checkpoint files written atomically at every epoch's end, read safely, and the random-number
state saved with them.

* :class:`ModelCheckpointEveryEpoch` is Lightning's ``ModelCheckpoint`` (``best.ckpt`` by the monitored metric)
  that also writes ``last.ckpt`` at the end of every training epoch and at every ``every_n_train_steps``,
  whatever the monitor does. Lightning writes ``last.ckpt`` only in a step where it also saved a top-k
  checkpoint, so a metric that plateaus, or no top-k checkpoint at all (validation on the test set), left
  ``last.ckpt`` at an earlier epoch or missing.
* :class:`AtomicCheckpointIO` writes each checkpoint to a temporary file beside the target
  (``<target>.tmp-<host>-<pid>``), flushes it to disk and renames it over the target (``os.replace`` is atomic
  on POSIX), so a SIGKILL during a save leaves the previous ``last.ckpt`` intact instead of a truncated one. A
  failed write (a full disk) removes its temporary file; one left by a killed process of this host is removed by
  the next write of the same target. It reads checkpoints with :func:`read_checkpoint_file`.
* :func:`read_checkpoint_file` loads with ``weights_only=True`` and turns an empty, truncated, random or
  refused file into one :class:`CheckpointFileError` naming the file and what was expected.
* :class:`RandomState` stores the Python, NumPy and torch generators in every checkpoint and restores
  them on resume, so the epochs after ``--ckpt_path last`` shuffle, crop and flip exactly as the
  uninterrupted run did.

A run killed mid-epoch (SIGTERM or SIGKILL) resumes from the last end-of-epoch checkpoint and
repeats the interrupted epoch; with a fixed seed and deterministic kernels its final weights and
metrics equal those of an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import io
import os
import random
import socket
from typing import Any, Dict, Iterator, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO

from finegrained.checkpoint_file import CheckpointFileError, read_checkpoint_file  # noqa: F401 (re-exported)


def temporary_name(path: str) -> str:
    """``<path>.tmp-<host>-<pid>``: beside the target (a rename is atomic only within one file system)."""
    return f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"


def remove_stale_temporaries(path: str) -> None:
    """Remove ``<path>.tmp-<this host>-<pid>`` files whose process is gone (a kill during a write)."""
    prefix = f"{path}.tmp-{socket.gethostname()}-"
    for stale in glob.glob(glob.escape(prefix) + "*"):
        pid = stale[len(prefix):]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            try:
                os.remove(stale)
            except OSError:
                pass
        except OSError:  # alive, owned by someone else
            pass


# Errors of the disk being written, as opposed to errors of what is being read or computed.
_WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


@contextlib.contextmanager
def replacing(path, what: str = "file") -> Iterator[str]:
    """Yield a temporary path beside ``path`` to write ``what`` into; when the block ends, it replaces ``path``
    (atomically, flushed to disk). If the block or the write fails (a full disk, an interrupt), the temporary file
    is removed and ``path`` is left as it was; a disk error names ``path``."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    remove_stale_temporaries(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(err, OSError) and err.errno in _WRITE_ERRORS:
            failed = OSError(f"{path}: could not write the {what} ({err.strerror or err}); the previous file, if "
                             f"any, is unchanged")
            failed.errno = err.errno
            raise failed from err
        raise


def write_atomically(path, data: bytes, what: str = "file") -> None:
    """Write ``data`` to ``path`` through :func:`replacing`."""
    with replacing(path, what) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written beside their target and renamed over it; read with :func:`read_checkpoint_file`."""

    def save_checkpoint(self, checkpoint: Dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        path = os.fspath(path)
        if "://" in path:  # remote storage: fsspec's own transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        # Serialised in memory first (as Lightning does), so a failing disk raises an OSError from write(), not an
        # error from inside torch's zip writer.
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        write_atomically(path, buffer.getbuffer(), "checkpoint")

    def load_checkpoint(self, path, map_location: Any = None, weights_only: Optional[bool] = None) -> Dict[str, Any]:
        path = os.fspath(path)
        if "://" in path:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        checkpoint = read_checkpoint_file(path, map_location=map_location or "cpu")
        missing = [key for key in ("state_dict", "pytorch-lightning_version")
                   if not isinstance(checkpoint, dict) or key not in checkpoint]
        if missing:
            raise CheckpointFileError(f"{path}: not a Lightning checkpoint (no {' or '.join(map(repr, missing))} "
                                      f"entry); expected a checkpoint written by finegrained fit")
        return checkpoint


def completed_epochs(checkpoint: Dict[str, Any]) -> int:
    """Training epochs completed when ``checkpoint`` was written (Lightning's ``epoch`` entry is the epoch
    counter, which the end of a fit has already moved on by one)."""
    try:
        return int(checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    except (KeyError, TypeError):
        return int(checkpoint.get("epoch", -1)) + 1


def planned_epochs(checkpoint: Dict[str, Any]) -> Optional[int]:
    """The epochs the fit that wrote ``checkpoint`` planned (its ``max_epochs``, kept by the run-artifacts
    callback), or None for a checkpoint without it."""
    planned = None
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if "RunArtifacts" in str(key) and isinstance(state, dict):
            planned = state.get("max_epochs")
    return planned


def checkpoint_selection(path: str, checkpoint: Dict[str, Any]) -> str:
    """``best <metric>`` for the monitored checkpoint, ``last epoch`` for one written at the end of the fit's last
    epoch, else ``epoch N of M`` (a fit that stopped or was stopped early) or ``epoch N``."""
    epochs = completed_epochs(checkpoint)
    planned = planned_epochs(checkpoint)
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if "ModelCheckpoint" in str(key) and isinstance(state, dict) and state.get("monitor"):
            if os.path.basename(state.get("best_model_path") or "") == os.path.basename(path):
                return f"best {state['monitor']}"
    if planned is not None and planned > 0:
        return "last epoch" if epochs >= planned else f"epoch {epochs} of {planned}"
    return f"epoch {epochs}"


class ModelCheckpointEveryEpoch(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` (``save_last``) is written at the end of every training epoch and at
    every ``every_n_train_steps``, not only when a top-k checkpoint is saved in the same step."""

    _last_written_at: Optional[int] = None  # global step of the last write of last.ckpt

    def _save_last_checkpoint(self, trainer: "pl.Trainer", monitor_candidates) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_written_at = trainer.global_step

    def _write_last(self, trainer: "pl.Trainer") -> None:
        """Write last.ckpt unless it holds this step already (as Lightning does: a step checkpoint written at the
        epoch's last step, or at a max_steps stop inside an epoch, is the one a resume continues from)."""
        if (not self.save_last or trainer.fast_dev_run or trainer.sanity_checking or trainer.state.fn != "fit"
                or self._last_written_at == trainer.global_step):
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._every_n_train_steps >= 1 and trainer.global_step % self._every_n_train_steps == 0:
            self._write_last(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._write_last(trainer)


class RandomState(pl.Callback):
    """Python, NumPy and torch (CPU and CUDA) random states, as plain tensors and lists.

    Saved when a checkpoint is written and put back as soon as it is restored: Lightning runs its
    sanity check inside ``isolate_rng`` and then creates the training iterator, which draws the
    sampler's seed from torch's generator, exactly where the uninterrupted run drew it.
    """

    def state_dict(self) -> Dict[str, Any]:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state = {"python": list(random.getstate()[1]), "python_version": random.getstate()[0],
                 "numpy_keys": torch.from_numpy(keys.astype(np.int64)), "numpy_pos": int(pos),
                 "numpy_gauss": [int(has_gauss), float(cached)], "torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if not state:
            return
        random.setstate((state["python_version"], tuple(state["python"]), None))
        has_gauss, cached = state["numpy_gauss"]
        np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                             int(has_gauss), cached))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
