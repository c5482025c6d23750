"""Exact resume: atomic checkpoint files and the random-number state saved with them.

* :class:`AtomicCheckpointIO` writes each checkpoint to a temporary file in the same folder and
  renames it over the target (``os.replace`` is atomic on POSIX), so a SIGKILL during a save leaves
  the previous ``last.ckpt`` intact instead of a truncated one.
* :class:`RandomState` stores the Python, NumPy and torch generators in every checkpoint and restores
  them on resume, so the epochs after ``--ckpt_path last`` shuffle, crop and flip exactly as the
  uninterrupted run did.

A run killed mid-epoch (SIGTERM or SIGKILL) resumes from the last end-of-epoch checkpoint and
repeats the interrupted epoch; with a fixed seed and deterministic kernels its final weights and
metrics equal those of an uninterrupted run.
"""
from __future__ import annotations

import os
import random
from typing import Any, Dict, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: Dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        path = os.fspath(path)
        tmp = f"{path}.tmp-{os.getpid()}"
        super().save_checkpoint(checkpoint, tmp, storage_options)
        os.replace(tmp, path)


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
