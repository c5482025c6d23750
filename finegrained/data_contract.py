"""What the library and the command line expect of a DataModule, declared once (instead of probing it).

Every DataModule of :mod:`datamodules` follows it (``datamodules.base.FineGrainedDataModule``); a user's own
LightningDataModule trains and tests without it, and gets one clear error from the features that need it (the
cached first stage of the two-stage protocols, the SVM test, the run record's validation column).

* ``num_classes``, ``class_names`` (K names, output k is class k), ``preprocessing`` (the test-time transform as
  data: what exports embed), ``dataset_id`` (``"cub"``, ``"aircraft"``, ... in run records).
* ``validation_is_test``: whether validation runs on the test split (the published protocol); then no
  checkpoint may be chosen by validation. Known without loading the images' pixels.
* ``unaugmented_train_dataloader()``: the training images with the evaluation transform, in order.
* ``skip_corrupt``: whether an unreadable image is skipped (logged) instead of stopping the run.
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, List, Protocol


class FineGrainedData(Protocol):
    num_classes: int
    class_names: List[str]
    preprocessing: Dict[str, Any]
    dataset_id: str
    validation_is_test: bool
    skip_corrupt: bool

    def unaugmented_train_dataloader(self) -> Any: ...


# The members of the protocol, read from it (the attributes it annotates and its one method).
CONTRACT = tuple(FineGrainedData.__annotations__) + ("unaugmented_train_dataloader",)
_MISSING = object()


def follows_contract(datamodule: Any) -> bool:
    """Whether ``datamodule`` declares every member of :class:`FineGrainedData`, looked up without running any
    (a property such as ``class_names`` may read files)."""
    return all(inspect.getattr_static(datamodule, name, _MISSING) is not _MISSING for name in CONTRACT)


def require_fine_grained_data(datamodule: Any, what: str) -> FineGrainedData:
    """``datamodule`` when it follows :class:`FineGrainedData`; ValueError saying what needs it otherwise."""
    if not follows_contract(datamodule):
        raise ValueError(f"{what} needs a finegrained DataModule (datamodules.*, or one following "
                         f"finegrained.data_contract.FineGrainedData); got {type(datamodule).__name__}")
    return datamodule
