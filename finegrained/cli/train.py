"""``finegrained fit | validate | test | predict``: training and evaluation through LightningCLI.

This is the one place where model and data meet: the DataModule's ``num_classes``,
``class_names`` and ``preprocessing`` are linked into the model's hyper-parameters, so every
checkpoint knows how to name its outputs and prepare its inputs. Recipes may inherit shared
settings through ``base:`` (:mod:`finegrained.cli.recipe`).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, List, Optional

from pytorch_lightning import LightningDataModule
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.utilities import rank_zero_info

from finegrained.cli.recipe import (RecipeError, config_hash, describe_config_error, expand_config_args,
                                    format_overrides, recipe_overrides, recipe_text, reference_recipe)
from finegrained.model import WEIGHTS_IN_CHECKPOINT, FineGrainedClassifier
from finegrained.resume import (AtomicCheckpointIO, ModelCheckpointEveryEpoch, RandomState, checkpoint_selection,
                                completed_epochs, read_checkpoint_file)
from finegrained.results.runs import RunArtifacts, append_run, device_name, git_commit
from finegrained.svm import svm_accuracy


def default_loggers(root: str) -> list:
    """CSV and TensorBoard in the same version folder (``root/lightning_logs/version_N``): the run artifacts and
    spreadsheets read the first, ``tensorboard --logdir`` the second (Lightning's own default is only one of them)."""
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    # CSV first: it creates the folder (it warns when the folder already holds files) and is trainer.log_dir.
    csv = CSVLogger(root, name="lightning_logs")
    return [csv, TensorBoardLogger(root, name="lightning_logs", version=csv.version)]


class FineGrainedCLI(LightningCLI):
    """LightningCLI with a best/last checkpoint callback and the data -> model links."""

    def __init__(self, *args, recipe_paths: Optional[List[str]] = None, command_line: Optional[List[str]] = None,
                 **kwargs):
        self.recipe_paths = recipe_paths or []
        self.command_line = list(command_line or [])
        self._test_started = 0.0
        self.overrides: Dict[str, Any] = {}
        super().__init__(*args, **kwargs)

    def init_parser(self, **kwargs) -> LightningArgumentParser:
        # A bad recipe raises (one line from finegrained.cli.entry_point) instead of printing the whole usage.
        kwargs.setdefault("exit_on_error", False)
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--runs_csv", default="results/runs.csv",
                            help="CSV file that every test run appends its record to ('' to skip)")
        parser.add_argument("--svm", type=bool, default=False,
                            help="test: also train one-vs-all linear SVMs (C = 1) on l2-normalised head features of "
                                 "the training images and their flips, and report their accuracy (B-CNN, HIHCA)")
        parser.add_argument("--select_on_test", type=bool, default=False,
                            help="when validation is the test set, still write best.ckpt chosen by val_top1 (the "
                                 "published code's practice: its number is a maximum over test evaluations)")
        parser.add_lightning_class_args(RunArtifacts, "run_artifacts")
        parser.add_lightning_class_args(RandomState, "random_state")
        parser.add_lightning_class_args(ModelCheckpointEveryEpoch, "checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "val_top1",
            "checkpoint.mode": "max",
            "checkpoint.filename": "best",
            "checkpoint.save_last": True,
            "checkpoint.enable_version_counter": False,
        })
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
        parser.link_arguments("data.preprocessing", "model.preprocessing", apply_on="instantiate")

    def instantiate_trainer(self, **kwargs):
        # Checkpoints are written atomically unless the recipe chose its own checkpoint plugin.
        trainer_config = self._get(self.config_init, "trainer", default={})
        if not trainer_config.get("plugins") and "plugins" not in kwargs:
            kwargs["plugins"] = [AtomicCheckpointIO()]
        if self.subcommand == "fit":
            self._honest_checkpoint_choice()
        logger = trainer_config.get("logger")
        if logger is None or logger is True:
            kwargs["logger"] = default_loggers(trainer_config.get("default_root_dir") or os.getcwd())
        if logger is not False and self.subcommand == "fit":
            # One learning-rate curve per parameter group (backbone, head, classifier), per epoch.
            kwargs["callbacks"] = list(trainer_config.get("callbacks") or []) + [
                LearningRateMonitor(logging_interval="epoch")]
        return super().instantiate_trainer(**kwargs)

    def _honest_checkpoint_choice(self) -> None:
        """Validation on the test set (the published protocol) must not choose the checkpoint: the result is
        then the last epoch, as the papers' fixed schedules report, and best.ckpt is not written."""
        checkpoint = self._get(self.config_init, "checkpoint", default=None)
        if (checkpoint is None or checkpoint.monitor is None or self._get(self.config_init, "select_on_test")
                or not getattr(self.datamodule, "validation_is_test", False)):
            return
        checkpoint.monitor, checkpoint.save_top_k = None, 0
        rank_zero_info("validation is the test set (the published protocol): the result is the last epoch "
                       f"({os.path.join(checkpoint.dirpath or '<log dir>/checkpoints', 'last.ckpt')}); best.ckpt "
                       "is not written, since choosing it would choose on the test set. To choose by validation, "
                       "give the data a validation split apart from its test split (val_fraction > 0 or a val/ "
                       "folder; for a folder without test/, add one), or --select_on_test true for the published "
                       "code's choice")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        super().parse_arguments(parser, args)
        # Lightning reads --ckpt_path's hyper-parameters right after parsing, with a plain torch.load: check the file
        # first, so that an empty, truncated or foreign file is one line naming it.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry"):
            checkpoint = read_checkpoint_file(ckpt_path, mmap=True)  # mapped: nothing is read twice
            missing = [key for key in ("state_dict", "hyper_parameters", "pytorch-lightning_version")
                       if not isinstance(checkpoint, dict) or key not in checkpoint]
            if missing:
                raise ValueError(f"{ckpt_path}: not a FineGrainedClassifier checkpoint (no {', '.join(missing)} "
                                 f"entry); expected a checkpoint written by finegrained fit")

    def _recipe_overrides(self, subcommand: str) -> Dict[str, Any]:
        """What this command line changes from its recipe(s) that changes what the run computes
        (:func:`finegrained.cli.recipe.recipe_overrides`): its configuration against that of the ``--config``
        files alone."""
        argv = sys.argv[1:]  # the recipes as LightningCLI read them (base: already merged)
        config_args = [arg for i, flag in enumerate(argv[:-1]) if flag == "--config" for arg in (flag, argv[i + 1])]
        # A recipe file derived from a project recipe is compared with that project recipe.
        references = [reference_recipe(p) if os.path.isfile(p) else p for p in _config_paths(self.command_line)]
        if references != _config_paths(self.command_line):
            config_args = [a for path in references for a in ("--config", recipe_text(path) if os.path.isfile(path)
                                                              else path)]
        try:
            recipe = self.parser.parse_args([subcommand] + config_args)[subcommand]
        except (argparse.ArgumentError, SystemExit):  # the recipe alone is incomplete: keep the command line
            rest = [a for i, a in enumerate(argv) if a != "--config" and (i == 0 or argv[i - 1] != "--config")]
            return {"command line": " ".join(rest[1:])} if len(rest) > 1 else {}
        return recipe_overrides(self.config[subcommand].as_dict(), recipe.as_dict(),
                                stage="fit" if subcommand == "fit" else "test")

    def before_instantiate_classes(self) -> None:
        sub = self.config.get("subcommand")
        if not sub:
            return
        cfg = self.config[sub]
        if sub in ("fit", "test", "validate"):
            self.overrides = self._recipe_overrides(sub)
        # A checkpoint (to evaluate, or to resume a fit from) holds every weight: read neither the
        # pretrained weights (a download) nor an init_from file just to overwrite them; the model
        # records the sources the checkpoint names when it is restored.
        if cfg.get("ckpt_path"):
            for key, value in WEIGHTS_IN_CHECKPOINT.items():
                cfg.model[key] = value
        # Lightning skips checkpoints under fast_dev_run except save_last at on_train_end, which
        # would overwrite a real run's last.ckpt (same dirpath in the recipe) with a one-batch model.
        if sub == "fit" and cfg.get("trainer", {}).get("fast_dev_run") and cfg.get("checkpoint"):
            cfg.checkpoint.save_last = False

    def before_fit(self) -> None:
        artifacts = self._run_artifacts()
        if artifacts is not None:
            artifacts.record_recipe(self.recipe_paths, self.overrides)

    def _run_artifacts(self) -> Optional[RunArtifacts]:
        return next((c for c in self.trainer.callbacks if isinstance(c, RunArtifacts)), None)

    def after_test(self) -> None:
        metrics = self.trainer.callback_metrics
        if "test_top1" in metrics and self.trainer.is_global_zero:
            accuracy = {key: float(metrics[f"test_{key}"]) for key in ("top1", "top5", "mean_class_acc")
                        if f"test_{key}" in metrics}
            n = getattr(self.model, "tested_images", "?")
            print(f"Test accuracy on {n} images: {_accuracy_text(accuracy)}")
            provenance = self._provenance()
            print(f"Checkpoint: {provenance['selection']}; validation: {provenance['validation']}"
                  + (" -- chosen on the test set, so this is a maximum over test evaluations (optimistic)"
                     if provenance["validation"] == "test set" and provenance["selection"].startswith("best") else ""))
            self._record_run(accuracy, provenance, "softmax")
            if self.config["test"].get("svm"):
                svm = self._svm_accuracy()
                print(f"SVM accuracy on {n} images (one-vs-all linear SVMs, C = 1, on l2-normalised head features of "
                      f"the training images and their flips): {_accuracy_text(svm)}")
                self._record_run(svm, provenance, "svm")

    def _svm_accuracy(self) -> Dict[str, float]:
        datamodule = self.datamodule
        if not hasattr(datamodule, "unaugmented_train_dataloader"):
            raise ValueError("--svm needs the training images without augmentation: a finegrained DataModule "
                             "(datamodules.*) provides unaugmented_train_dataloader()")
        loader = datamodule.unaugmented_train_dataloader()
        return svm_accuracy(self.model, loader.dataset, datamodule.test_dataset, batch_size=loader.batch_size,
                            num_workers=loader.num_workers)

    def _provenance(self) -> Dict[str, Any]:
        """Which checkpoint was tested (last epoch, epoch N of M, best <metric>), how many epochs it trained and
        whether validation was held out."""
        validation = getattr(self.datamodule, "validation_is_test", None)
        validation = "unknown" if validation is None else "test set" if validation else "held-out"
        ckpt_path = self.config["test"].get("ckpt_path")
        if not ckpt_path or not os.path.isfile(ckpt_path):
            return {"validation": validation, "selection": "model as instantiated", "epochs": ""}
        checkpoint = read_checkpoint_file(ckpt_path, mmap=True)
        return {"validation": validation, "selection": checkpoint_selection(ckpt_path, checkpoint),
                "epochs": completed_epochs(checkpoint), "checkpoint": checkpoint}

    def _record_run(self, accuracy: Dict[str, float], provenance: Dict[str, Any], classifier: str) -> None:
        cfg = self.config["test"]
        if not cfg.get("runs_csv"):
            return
        model, datamodule = self.model, self.datamodule
        ckpt_path = cfg.get("ckpt_path")
        checkpoint = provenance.get("checkpoint")
        # What the fit recorded in the checkpoint (None: no checkpoint; {}: written by another tool).
        fit_state = None if checkpoint is None else next(
            (state for key, state in (checkpoint.get("callbacks") or {}).items() if key.startswith("RunArtifacts")), {})
        train_wall = (fit_state or {}).get("train_wall_s")
        hashed = {k: v for k, v in cfg.as_dict().items() if k not in ("ckpt_path", "config", "runs_csv", "select_on_test", "svm")}
        artifacts = self._run_artifacts()
        record = {
            "git_commit": git_commit(),
            "recipe": ";".join(self.recipe_paths),
            "config_hash": config_hash(hashed),
            "dataset": getattr(datamodule, "dataset_id", None) or type(datamodule).__name__,
            "method": model.hparams.head,
            "backbone": model.hparams.backbone,
            "head_dim": model.head.output_dim,
            "epochs": provenance["epochs"],
            "top1": accuracy["top1"],
            "top5": accuracy.get("top5", ""),
            "mean_class_acc": accuracy["mean_class_acc"],
            "train_wall_s": "" if train_wall is None else round(float(train_wall), 1),
            "test_wall_s": round(artifacts.test_wall_s, 1) if artifacts else "",
            "device": device_name(self.trainer),
            "checkpoint": ckpt_path or "",
            "plots": ";".join(artifacts.plots) if artifacts else "",
            "validation": provenance["validation"],
            "selection": provenance["selection"],
            "classifier": classifier,
            "overrides": run_overrides(fit_state, self.recipe_paths, self.overrides),
        }
        row = append_run(cfg.runs_csv, record)
        print(f"Recorded run {row['run_id']} in {cfg.runs_csv}")

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        # Checkpoints are only ever unpickled as plain tensors and containers.
        if "weights_only" in self._subcommand_method_arguments[subcommand] and kwargs.get("weights_only") is None:
            kwargs["weights_only"] = True
        return kwargs


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


def _accuracy_text(accuracy: Dict[str, float]) -> str:
    names = {"top1": "top-1", "top5": "top-5", "mean_class_acc": "mean per-class"}
    return ", ".join(f"{names[key]} {accuracy[key]:.4f}" for key in names if key in accuracy)


def _config_paths(argv: List[str]) -> List[str]:
    paths = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    return paths + [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]


def run_lightning_cli(args: Optional[List[str]] = None, other_commands: Optional[List[str]] = None) -> FineGrainedCLI:
    """``finegrained fit | validate | test | predict``; ``other_commands`` are listed in ``--help``."""
    argv = list(sys.argv[1:] if args is None else args)
    # LightningCLI reads sys.argv; give it the expanded recipes there (passing them as ``args``
    # besides a different sys.argv makes it warn about a possible mistake).
    saved_argv, sys.argv = sys.argv, [sys.argv[0] if sys.argv else "finegrained"] + expand_config_args(argv)
    try:
        return _build_cli(argv, other_commands or [])
    except argparse.ArgumentError as err:  # the parser refused a setting: which one, where, and what it expected
        raise RecipeError(describe_config_error(str(err), argv)) from None
    except ValueError as err:  # a class refused its arguments as jsonargparse built it: which class, and why
        if not str(err).startswith("Does not validate against any of the Union subtypes"):
            raise
        raise RecipeError(describe_config_error(str(err), argv)) from None
    finally:
        sys.argv = saved_argv


def _build_cli(argv: List[str], other_commands: List[str]) -> FineGrainedCLI:
    others = " | ".join(other_commands)
    return FineGrainedCLI(
        FineGrainedClassifier,
        LightningDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": "The finegrained command: fit | validate | test | predict (LightningCLI, "
                       "below)" + (f"; also {others} (see finegrained <command> --help)" if others else "") + "."},
        recipe_paths=[p for p in _config_paths(argv) if os.path.isfile(p)],
        command_line=argv,
    )
