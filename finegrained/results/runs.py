"""Run records: one CSV row per ``finegrained test`` run, and the plots saved with each run.

``results/runs.csv`` (or the CLI's ``--runs_csv``) gets a row with the fields of
:data:`RUN_FIELDS`; :class:`RunArtifacts` is the Lightning callback that keeps per-epoch metrics,
the training wall time (stored in the checkpoint, so it survives resumes) and writes
``training_curves.png`` after fit and ``confusion_matrix.png`` after test into the run's log folder.
"""
from __future__ import annotations

import csv
import datetime
import hashlib
import json
import os
import platform
import subprocess
import time
import uuid
from typing import Any, Dict, List, Optional

import pandas as pd
import pytorch_lightning as pl
import torch
import yaml

from finegrained.data_contract import follows_contract
from finegrained.resume import checkpoint_selection, completed_epochs, read_checkpoint_file
from finegrained.results.plots import plot_confusion_matrix, plot_training_curves

RUN_FIELDS = ["run_id", "timestamp", "git_commit", "recipe", "config_hash", "dataset", "method", "backbone",
              "head_dim", "epochs", "top1", "top5", "mean_class_acc", "train_wall_s", "test_wall_s", "device",
              "checkpoint", "plots", "validation", "selection", "classifier", "overrides", "job_id"]
# dataset: the DataModule's dataset_id ("cub", "aircraft", "cars", ...), the key of results/reference.csv.
# validation: "held-out" (chosen apart from the test set) or "test set" (the published protocol).
# selection: which checkpoint was tested: "last epoch", "epoch N" or "best <metric>".
# classifier: "softmax" (the network's own) or "svm" (finegrained test --svm: the SVM protocol).
# overrides: what the fit and the test changed from their recipe ("key=value; ..."), '' when the run follows it
#   (finegrained.cli.recipe.recipe_overrides); the tables mark such runs.
# job_id: the scheduler's id of the job that ran the test (SLURM's, "<array id>_<task>" in a job array, or
#   "local-<pid>" for finegrained launch --executor local), '' outside a scheduler.


NOT_RECORDED = "not recorded"
# The columns of the first run records; later columns (validation, selection, classifier, overrides, job_id) are
# added, empty, to an older file.
RUN_FIELDS_SINCE_THE_START = ["run_id", "timestamp", "recipe", "dataset", "method", "backbone", "top1",
                              "mean_class_acc"]


def git_commit(cwd: Optional[str] = None) -> str:
    """HEAD's hash (with ``-dirty`` for uncommitted changes) of the repository holding this package (or ``cwd``),
    or ``unknown`` when it is not in one (an installed copy)."""
    cwd = cwd or os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip()[:12] + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def scheduler_job_id() -> str:
    """The job id as ``squeue``/``sacct`` show it (``<array id>_<task>`` for an array task), ``local-<pid>`` for
    submitit's local executor, or '' outside a scheduler."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if os.environ.get("SLURM_JOB_ID"):
        return os.environ["SLURM_JOB_ID"]
    if os.environ.get("SUBMITIT_LOCAL_JOB_ID"):
        return f"local-{os.environ['SUBMITIT_LOCAL_JOB_ID']}"
    return ""


def device_name(trainer: pl.Trainer) -> str:
    root = trainer.strategy.root_device
    if root.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(root)} x{trainer.num_devices}"
    return f"{root.type}:{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def append_run(path: str, record: Dict[str, Any]) -> Dict[str, Any]:
    """Append ``record`` (missing fields empty) to the CSV at ``path``, writing the header for a new file."""
    row = {field: record.get(field, "") for field in RUN_FIELDS}
    row["run_id"] = row["run_id"] or uuid.uuid4().hex[:8]
    row["timestamp"] = row["timestamp"] or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = not os.path.isfile(path) or os.path.getsize(path) == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != RUN_FIELDS and set(header) < set(RUN_FIELDS):  # fewer columns: add the missing ones
            older = pd.read_csv(path, dtype=str, keep_default_na=False).reindex(columns=RUN_FIELDS, fill_value="")
            if "overrides" not in header:  # unknown is not "none": such runs are never shown as following a recipe
                older["overrides"] = NOT_RECORDED
            older.to_csv(path, index=False)
        elif header != RUN_FIELDS:
            raise ValueError(f"{path} has columns {header}; expected {RUN_FIELDS}. Move it aside to start a new file.")
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RUN_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)
    return row


def read_runs(path: str) -> pd.DataFrame:
    """The run records at ``path`` (an empty frame with the right columns if there is none)."""
    if not os.path.isfile(path):
        return pd.DataFrame(columns=RUN_FIELDS)
    try:
        runs = pd.read_csv(path, dtype={"run_id": str, "git_commit": str, "config_hash": str, "overrides": str,
                                        "job_id": str})
    except (ValueError, pd.errors.ParserError) as err:  # not text, not CSV
        raise ValueError(f"{path}: not a CSV of run records ({str(err).splitlines()[0][:120]}); expected the file "
                         f"finegrained test appends to") from None
    missing = [field for field in RUN_FIELDS_SINCE_THE_START if field not in runs.columns]
    if missing:  # columns added later are filled in below; these every record file of this tool has
        raise ValueError(f"{path}: lacks the columns {missing} of a run record; expected the file finegrained test "
                         f"appends to")
    for column in ("top1", "top5", "mean_class_acc"):
        given = runs[column].notna() & (runs[column].astype(str).str.strip() != "")
        numbers = pd.to_numeric(runs[column].where(given), errors="coerce")
        bad = given & (numbers.isna() | (numbers < 0) | (numbers > 1))
        if bad.any():
            row = int(bad.idxmax())
            raise ValueError(f"{path}: row {row + 2}: {column} is {str(runs[column][row])!r}; expected a fraction "
                             f"between 0 and 1 (a record finegrained test wrote)")
        runs[column] = numbers
    if "overrides" not in runs.columns:
        runs["overrides"] = NOT_RECORDED
    runs["overrides"] = runs["overrides"].fillna("")
    return runs.reindex(columns=list(runs.columns) + [f for f in RUN_FIELDS if f not in runs.columns])


class RunArtifacts(pl.Callback):
    """Per-epoch metrics, training wall time and the plots of a run."""

    def __init__(self):
        self.history: List[Dict[str, float]] = []
        self.max_epochs: Optional[int] = None  # the fit's plan, so a checkpoint tells "last epoch" from "epoch N of M"
        self.recipes: List[str] = []  # the fit's recipe files and what its command line changed from them
        self.overrides: Dict[str, Any] = {}
        self._session_overrides: Dict[str, Any] = {}
        self._epoch_lr: Dict[str, float] = {}
        self.train_wall_s = 0.0
        self._fit_started: Optional[float] = None
        self._test_started: Optional[float] = None
        self.test_wall_s = 0.0
        self.plots: List[str] = []

    # -- fit ---------------------------------------------------------------------------------
    def record_recipe(self, recipes: List[str], overrides: Dict[str, Any]) -> None:
        """The fit's recipe files and its overrides; a resumed fit adds its own to those the checkpoint holds."""
        # Plain JSON values only: the checkpoint is read back with weights_only=True, which refuses other objects.
        self.recipes = [str(path) for path in recipes]
        self._session_overrides = json.loads(json.dumps(dict(overrides), default=str))

    def on_fit_start(self, trainer, pl_module):
        self._fit_started = time.perf_counter()
        self.max_epochs = trainer.max_epochs

    def _elapsed(self) -> float:
        return self.train_wall_s + (time.perf_counter() - self._fit_started if self._fit_started else 0.0)

    def on_train_epoch_start(self, trainer, pl_module):
        # The learning rate each group trains this epoch with: read now, since an epoch schedule has already
        # moved on to the next epoch's by the time the epoch-end hooks run.
        self._epoch_lr = {f"lr-{group.get('name', k)}": float(group["lr"])
                          for optimizer in trainer.optimizers for k, group in enumerate(optimizer.param_groups)}

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        row = {"epoch": trainer.current_epoch}
        # Learning rates come from the epoch's start, one per parameter group under its own name; LearningRateMonitor's
        # copies ("lr-SGD/backbone") would draw every group twice.
        row.update({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1 and not k.startswith("lr-")})
        row.update(self._epoch_lr)
        self.history.append(row)

    @staticmethod
    def _run_folder(trainer) -> Optional[str]:
        """The run's log folder; None for smoke runs (fast_dev_run) and runs without a logger."""
        if trainer.fast_dev_run or not trainer.loggers:
            return None
        folder = trainer.log_dir  # a collective under DDP: every rank must ask
        return folder if trainer.is_global_zero else None

    def on_fit_end(self, trainer, pl_module):
        self.train_wall_s = self._elapsed()
        self._fit_started = None
        folder = self._run_folder(trainer)
        if self.history and folder:
            history = pd.DataFrame(self.history).drop_duplicates("epoch", keep="last")
            history.to_csv(os.path.join(folder, "history.csv"), index=False)
            self.plots.append(plot_training_curves(history, os.path.join(folder, "training_curves.png")))

    def state_dict(self) -> Dict[str, Any]:
        return {"train_wall_s": self._elapsed(), "history": self.history, "max_epochs": self.max_epochs,
                "recipes": self.recipes, "overrides": {**self.overrides, **self._session_overrides}}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.train_wall_s = float(state_dict.get("train_wall_s", 0.0))
        self.history = list(state_dict.get("history", []))
        self.overrides = dict(state_dict.get("overrides") or {})

    # -- test --------------------------------------------------------------------------------
    def on_test_start(self, trainer, pl_module):
        self._test_started = time.perf_counter()

    def on_test_end(self, trainer, pl_module):
        self.test_wall_s = time.perf_counter() - (self._test_started or time.perf_counter())
        confusion = getattr(pl_module, "test_confusion", None)
        if confusion is None or trainer.fast_dev_run:
            return
        counts = confusion.compute().cpu().numpy()  # synced across ranks: every rank computes
        folder = self._run_folder(trainer)
        if not folder:
            return
        names = pl_module.hparams.get("class_names")
        os.makedirs(folder, exist_ok=True)
        pd.DataFrame(counts, index=names, columns=names).to_csv(os.path.join(folder, "confusion_matrix.csv"))
        self.plots.append(plot_confusion_matrix(counts, names, os.path.join(folder, "confusion_matrix.png")))


# -- the record of a test run ---------------------------------------------------------------------------------
def config_hash(config: Dict[str, Any]) -> str:
    """A short, key-order-independent hash of a configuration mapping."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def format_overrides(overrides: Dict[str, Any]) -> str:
    """``key=value; key=value`` with YAML values (``null``, ``2``, ``[1, 2]``), or '' for none."""
    def text(value):
        return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()

    return "; ".join(f"{key}={text(value)}" for key, value in overrides.items())


def run_overrides(fit_state: Optional[Dict[str, Any]], test_recipes: List[str], test_overrides: Dict[str, Any]) -> str:
    """What the tested model's fit and this test changed from their recipes, as one text (empty: the run follows
    its recipe). ``fit_state`` is the run-artifacts state the fit saved in the checkpoint (None: no checkpoint was
    tested; without ``overrides``: a fit this tool did not record). A fit with another recipe than the test's is an
    override too."""
    if fit_state is None:
        fit = {"checkpoint": "none (the model as instantiated)"}
    elif "overrides" not in fit_state:
        fit = {"fit": "not recorded"}
    else:
        fit = dict(fit_state["overrides"])
        if list(fit_state.get("recipes") or []) != list(test_recipes):
            fit["fit recipe"] = ";".join(fit_state.get("recipes") or []) or "none"
    test = {f"test {key}": value for key, value in test_overrides.items() if fit.get(key, object()) != value}
    return "; ".join(part for part in (format_overrides(fit), format_overrides(test)) if part)


ACCURACY_NAMES = {"top1": "top-1", "top5": "top-5", "mean_class_acc": "mean per-class"}


def accuracy_from_metrics(metrics: Dict[str, Any]) -> Dict[str, float]:
    """top1, top5 and mean_class_acc from the trainer's ``test_*`` metrics (those present)."""
    return {key: float(metrics[f"test_{key}"]) for key in ACCURACY_NAMES if f"test_{key}" in metrics}


def accuracy_text(accuracy: Dict[str, float]) -> str:
    return ", ".join(f"{ACCURACY_NAMES[key]} {accuracy[key]:.4f}" for key in ACCURACY_NAMES if key in accuracy)


def validation_kind(datamodule: Any) -> str:
    """``"test set"``, ``"held-out"`` or ``"unknown"`` (a DataModule outside :mod:`finegrained.data_contract`)."""
    if not follows_contract(datamodule):
        return "unknown"
    return "test set" if datamodule.validation_is_test else "held-out"


def checkpoint_provenance(ckpt_path: Optional[str], datamodule: Any) -> Dict[str, Any]:
    """Which checkpoint was tested (last epoch, epoch N of M, best <metric>), how many epochs it trained, whether
    validation was held out, and the checkpoint itself (``checkpoint``, memory-mapped) when there is one."""
    validation = validation_kind(datamodule)
    if not ckpt_path or not os.path.isfile(ckpt_path):
        return {"validation": validation, "selection": "model as instantiated", "epochs": ""}
    checkpoint = read_checkpoint_file(ckpt_path, mmap=True)
    return {"validation": validation, "selection": checkpoint_selection(ckpt_path, checkpoint),
            "epochs": completed_epochs(checkpoint), "checkpoint": checkpoint}


def run_record(trainer: pl.Trainer, model: pl.LightningModule, datamodule: Any, accuracy: Dict[str, float],
                    provenance: Dict[str, Any], classifier: str, recipes: List[str], overrides: Dict[str, Any],
                    config: Dict[str, Any], ckpt_path: Optional[str]) -> Dict[str, Any]:
    """The row ``finegrained test`` appends to the runs CSV (:data:`RUN_FIELDS` but ``run_id`` and ``timestamp``).

    ``config`` is the test's configuration (hashed, without the settings that do not change what is evaluated);
    ``overrides`` what its command line changed from its recipes."""
    checkpoint = provenance.get("checkpoint")
    # What the fit recorded in the checkpoint (None: no checkpoint; {}: written by another tool).
    fit_state = None if checkpoint is None else next(
        (state for key, state in (checkpoint.get("callbacks") or {}).items() if key.startswith("RunArtifacts")), {})
    train_wall = (fit_state or {}).get("train_wall_s")
    hashed = {k: v for k, v in config.items() if k not in ("ckpt_path", "config", "runs_csv", "select_on_test", "svm")}
    artifacts = next((c for c in trainer.callbacks if isinstance(c, RunArtifacts)), None)
    return {
        "git_commit": git_commit(),
        "recipe": ";".join(recipes),
        "config_hash": config_hash(hashed),
        "dataset": datamodule.dataset_id if follows_contract(datamodule) else type(datamodule).__name__,
        "method": model.hparams.head,
        "backbone": model.hparams.backbone,
        "head_dim": model.network.head.output_dim,
        "epochs": provenance["epochs"],
        "top1": accuracy["top1"],
        "top5": accuracy.get("top5", ""),
        "mean_class_acc": accuracy["mean_class_acc"],
        "train_wall_s": "" if train_wall is None else round(float(train_wall), 1),
        "test_wall_s": round(artifacts.test_wall_s, 1) if artifacts else "",
        "device": device_name(trainer),
        "checkpoint": ckpt_path or "",
        "plots": ";".join(artifacts.plots) if artifacts else "",
        "validation": provenance["validation"],
        "selection": provenance["selection"],
        "classifier": classifier,
        "overrides": run_overrides(fit_state, recipes, overrides),
        "job_id": scheduler_job_id(),
    }


def checkpoint_record(checkpoint: str, runs_csv: str, run_id: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """The newest softmax record of ``finegrained test`` for ``checkpoint`` in ``runs_csv`` (or the record
    ``run_id``), or None. A record is of the checkpoint when it names the same file (as ``finegrained test`` was
    given it, resolved from here) and is not older than the file: a checkpoint written again since has not been
    tested. An SVM record is not the network's own accuracy and is never chosen. The record's ``method`` and
    ``backbone`` travel with it, for the caller to check against the checkpoint."""
    if not os.path.isfile(runs_csv):
        raise FileNotFoundError(f"{runs_csv}: not found; expected the run records finegrained test writes "
                                f"(--runs-csv)")
    runs = read_runs(runs_csv)
    written = pd.Timestamp(os.path.getmtime(checkpoint), unit="s", tz="UTC").floor("s")  # records keep seconds
    tested_after = pd.to_datetime(runs["timestamp"], utc=True, errors="coerce", format="ISO8601") >= written
    if run_id is not None:
        chosen = runs[runs["run_id"].astype(str) == str(run_id)]
        if chosen.empty:
            raise ValueError(f"{runs_csv}: no run {run_id!r}; expected a run_id of finegrained test")
        if not tested_after[chosen.index[-1]]:
            raise ValueError(f"{runs_csv}: run {run_id} ({chosen['timestamp'].iloc[-1]}) is older than {checkpoint}; "
                             f"expected a test of this checkpoint")
    else:
        target = os.path.realpath(checkpoint)
        same = pd.Series([bool(p) and os.path.realpath(p) == target for p in runs["checkpoint"].fillna("").astype(str)],
                         index=runs.index, dtype=bool)
        softmax = pd.Series([c != "svm" for c in runs["classifier"].fillna("").astype(str)], index=runs.index,
                            dtype=bool)
        chosen = runs[same & softmax & tested_after]
        if chosen.empty:
            return None
    row = chosen.sort_values("timestamp").iloc[-1]
    fields = ("run_id", "timestamp", "dataset", "method", "backbone", "recipe", "epochs", "checkpoint", "top1",
              "top5", "mean_class_acc", "selection", "validation", "classifier", "overrides")
    record = {}
    for key in fields:
        value = row.get(key)
        if value is None or (isinstance(value, float) and value != value):
            continue
        record[key] = value.item() if hasattr(value, "item") else value
    return record
