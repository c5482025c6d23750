"""Reading a checkpoint file safely: ``torch.load(weights_only=True)`` with every way a file can be unreadable
turned into one clear error naming it (no Lightning here: :class:`finegrained.network.FineGrainedNetwork` reads
checkpoints too)."""
from __future__ import annotations

import os
import pickle
import re
from typing import Any

import torch


class CheckpointFileError(ValueError):
    """A checkpoint file that cannot be read as a PyTorch checkpoint of tensors and containers."""


FIT_CHECKPOINT = "a checkpoint written by finegrained fit"


def read_checkpoint_file(path, map_location: Any = "cpu", mmap: bool = False, expected: str = FIT_CHECKPOINT) -> Any:
    """``torch.load(path, weights_only=True)``, with every way a file can be unreadable as one clear error, ending
    with what was ``expected``.

    Raises:
        FileNotFoundError: no such file.
        CheckpointFileError: a folder, an empty, truncated or random file, or a pickle of other Python objects
            than tensors and containers (refused: only weights are ever unpickled).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: checkpoint not found")
    if os.path.isdir(path):
        raise CheckpointFileError(f"{path}: is a folder; expected a checkpoint file (.ckpt)")
    if os.path.getsize(path) == 0:
        raise CheckpointFileError(f"{path}: file is empty (0 bytes); expected {expected}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        # A global (function or class) the safe unpickler refuses; random bytes give "Unsupported operand" instead.
        refused = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(err))
        if refused:
            what = f" ({refused.group(1)})"
            raise CheckpointFileError(
                f"{path}: holds a pickled Python object{what}, which is refused: checkpoints are read with "
                f"weights_only=True (tensors and containers only)") from None
        raise CheckpointFileError(f"{path}: not a readable PyTorch checkpoint (truncated, or another kind of file); "
                                  f"expected {expected}") from err
    except MemoryError:
        raise
    except Exception as err:  # RuntimeError (zip), EOFError, KeyError, ...: the file's content, not the code
        raise CheckpointFileError(f"{path}: not a readable PyTorch checkpoint (truncated, or another kind of file); "
                                  f"expected {expected}") from err
