"""``finegrained fit | validate | test | predict``: training and evaluation through LightningCLI.

This is the one place where model and data meet: the DataModule's ``num_classes``,
``class_names`` and ``preprocessing`` are linked into the model's hyper-parameters, so every
checkpoint knows how to name its outputs and prepare its inputs. Recipes may inherit shared
settings through ``base:`` (:mod:`finegrained.cli.recipe`).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any, Dict, List, Optional, Set

from pytorch_lightning import LightningDataModule
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.utilities import rank_zero_info

from finegrained.callbacks import ActivationGradientClipping, DataDependentInit, SVMTest, TwoStageFinetuning
from finegrained.cli.recipe import (MOVED, RecipeError, describe_config_error, expand_config_args,
                                    recipe_overrides, recipe_text, reference_recipe, where_set)
from finegrained.data_contract import follows_contract
from finegrained.model import WEIGHTS_IN_CHECKPOINT, FineGrainedClassifier
from finegrained.resume import AtomicCheckpointIO, ModelCheckpointEveryEpoch, RandomState, read_checkpoint_file
from finegrained.results.runs import (RunArtifacts, accuracy_from_metrics, accuracy_text, append_run,
                                      checkpoint_provenance, run_record)


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
        self._checkpoint_hparams: Dict[str, Any] = {}  # those of --ckpt_path, read once in parse_arguments
        super().__init__(*args, **kwargs)

    def subcommands(self) -> Dict[str, Set[str]]:
        """Only the subcommand being run gets its parser (the other three cost about 0.2 s of every command); all
        four for ``--help`` or anything that does not start with one of them."""
        every = LightningCLI.subcommands()
        asked = self.command_line[0] if self.command_line else None
        return {asked: every[asked]} if asked in every else every

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
        # The papers' protocols (finegrained.callbacks), each under its own key of the recipe.
        parser.add_lightning_class_args(TwoStageFinetuning, "stage1")
        parser.add_lightning_class_args(DataDependentInit, "data_init")
        parser.add_lightning_class_args(ActivationGradientClipping, "clip_activation_grad")
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

    def _settings(self):
        """This command's instantiated configuration."""
        return self.config_init[self.subcommand] if self.subcommand else self.config_init

    def instantiate_trainer(self, **kwargs):
        # Checkpoints are written atomically unless the recipe chose its own checkpoint plugin.
        settings = self._settings()
        trainer_config = settings.get("trainer") or {}
        if not trainer_config.get("plugins") and "plugins" not in kwargs:
            kwargs["plugins"] = [AtomicCheckpointIO()]
        if self.subcommand == "fit":
            self._honest_checkpoint_choice()
        logger = trainer_config.get("logger")
        if logger is None or logger is True:
            kwargs["logger"] = default_loggers(trainer_config.get("default_root_dir") or os.getcwd())
        extra = []
        if logger is not False and self.subcommand == "fit":
            # One learning-rate curve per parameter group (backbone, head, classifier), per epoch.
            extra.append(LearningRateMonitor(logging_interval="epoch"))
        if self.subcommand == "test" and settings.get("svm"):
            extra.append(SVMTest())
        if extra:
            kwargs["callbacks"] = list(trainer_config.get("callbacks") or []) + extra
        return super().instantiate_trainer(**kwargs)

    def _honest_checkpoint_choice(self) -> None:
        """Validation on the test set (the published protocol) must not choose the checkpoint: the result is
        then the last epoch, as the papers' fixed schedules report, and best.ckpt is not written."""
        settings = self._settings()
        checkpoint = settings.get("checkpoint")
        if (checkpoint is None or checkpoint.monitor is None or settings.get("select_on_test")
                or not follows_contract(self.datamodule) or not self.datamodule.validation_is_test):
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
        # Checkpoints are only ever unpickled as plain tensors and containers.
        if subcommand and "weights_only" in self.config[subcommand] and self.config[subcommand].weights_only is None:
            self.config[subcommand].weights_only = True
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry"):
            checkpoint = read_checkpoint_file(ckpt_path, mmap=True)  # mapped: nothing is read twice
            if os.path.isfile(ckpt_path):  # what Lightning gives the model next; the recipe comparison needs it too
                self._checkpoint_hparams = dict(checkpoint.get("hyper_parameters") or {})
            missing = [key for key in ("state_dict", "hyper_parameters", "pytorch-lightning_version")
                       if not isinstance(checkpoint, dict) or key not in checkpoint]
            if missing:
                raise ValueError(f"{ckpt_path}: not a FineGrainedClassifier checkpoint (no {', '.join(missing)} "
                                 f"entry); expected a checkpoint written by finegrained fit")
            # Lightning gives the checkpoint's hyper-parameters to the parser next: settings of an earlier version
            # would be reported as if the command line had them.
            former = sorted(key for key in checkpoint["hyper_parameters"] if f"model.{key}" in MOVED)
            if former:
                raise ValueError(f"{ckpt_path}: written by an earlier finegrained (its settings {', '.join(former)} "
                                 f"have moved, e.g. model.{former[0]} is now {MOVED['model.' + former[0]]}); "
                                 f"finegrained export and report read it, or fine-tune from it with "
                                 f"--model.init_from")

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
            parsed = self.parser.parse_args([subcommand] + config_args)
            # With a checkpoint, Lightning gives the model the checkpoint's hyper-parameters (a resumed fit trains
            # the checkpoint's model, whose changes from the recipe its first fit recorded): the recipe gets them too.
            hparams = dict(self._checkpoint_hparams)
            hparams.pop("_instantiator", None)
            if hparams and "_class_path" not in hparams:
                parsed = self.parser.parse_object({subcommand: {"model": hparams}}, parsed)
            recipe = parsed[subcommand]
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
        artifacts = next((c for c in self.trainer.callbacks if isinstance(c, RunArtifacts)), None)
        if artifacts is not None:
            artifacts.record_recipe(self.recipe_paths, self.overrides)

    def after_test(self) -> None:
        """Print the test's accuracy and which checkpoint it is, and record the run (finegrained.results.runs)."""
        metrics = self.trainer.callback_metrics
        if "test_top1" not in metrics or not self.trainer.is_global_zero:
            return
        accuracy = accuracy_from_metrics(metrics)
        n = getattr(self.model, "tested_images", "?")
        print(f"Test accuracy on {n} images: {accuracy_text(accuracy)}")
        provenance = checkpoint_provenance(self.config["test"].get("ckpt_path"), self.datamodule)
        print(f"Checkpoint: {provenance['selection']}; validation: {provenance['validation']}"
              + (" -- chosen on the test set, so this is a maximum over test evaluations (optimistic)"
                 if provenance["validation"] == "test set" and provenance["selection"].startswith("best") else ""))
        self._record(accuracy, provenance, "softmax")
        svm = next((c.accuracy for c in self.trainer.callbacks if isinstance(c, SVMTest)), None)
        if svm is not None:
            print(f"SVM accuracy on {n} images (one-vs-all linear SVMs, C = 1, on l2-normalised head features of "
                  f"the training images and their flips): {accuracy_text(svm)}")
            self._record(svm, provenance, "svm")

    def _record(self, accuracy: Dict[str, float], provenance: Dict[str, Any], classifier: str) -> None:
        cfg = self.config["test"]
        if cfg.get("runs_csv"):
            record = run_record(self.trainer, self.model, self.datamodule, accuracy, provenance, classifier,
                                self.recipe_paths, self.overrides, cfg.as_dict(), cfg.get("ckpt_path"))
            row = append_run(cfg.runs_csv, record)
            print(f"Recorded run {row['run_id']} in {cfg.runs_csv}")


def _config_paths(argv: List[str]) -> List[str]:
    paths = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    return paths + [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]


class _Parsed(Exception):
    """Raised by :class:`_ParseOnlyCLI` once the command line is parsed; ``config`` is the command's configuration."""

    def __init__(self, config):
        super().__init__("parsed")
        self.config = config


class _ParseOnlyCLI(FineGrainedCLI):
    """Parses and checks a command line exactly as the command would, and stops before building anything."""

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        super().parse_arguments(parser, args)
        raise _Parsed(self.config[self.config["subcommand"]])


def check_command_line(args: List[str]):
    """Check ``finegrained fit|test ARGS`` (recipes, settings, types, unknown keys) without building the model or
    the data, and return the command's configuration; raises the error the command would (one line from
    :func:`finegrained.cli.entry_point`)."""
    try:
        run_lightning_cli(args, cli_class=_ParseOnlyCLI)
    except _Parsed as parsed:
        return parsed.config
    raise RuntimeError("the command line was not parsed")  # unreachable: parse_arguments always raises


def run_lightning_cli(args: Optional[List[str]] = None, other_commands: Optional[List[str]] = None,
                      cli_class: type = FineGrainedCLI) -> FineGrainedCLI:
    """``finegrained fit | validate | test | predict``; ``other_commands`` are listed in ``--help``."""
    argv = list(sys.argv[1:] if args is None else args)
    # LightningCLI reads sys.argv; give it the expanded recipes there (passing them as ``args``
    # besides a different sys.argv makes it warn about a possible mistake).
    saved_argv, sys.argv = sys.argv, [sys.argv[0] if sys.argv else "finegrained"] + expand_config_args(argv)
    try:
        return _build_cli(argv, other_commands or [], cli_class)
    except argparse.ArgumentError as err:  # the parser refused a setting: which one, where, and what it expected
        raise RecipeError(describe_config_error(str(err), argv)) from None
    except ValueError as err:  # a class refused its arguments as jsonargparse built it: which class, and why
        protocol = re.match(r"(stage1|data_init|clip_activation_grad) (\w+) (.*)", str(err))
        if protocol:  # a protocol callback's own check: the recipe (or command line) that set it
            key = f"{protocol.group(1)}.{protocol.group(2)}"
            raise RecipeError(f"{where_set(key, argv)}: {key}: {protocol.group(3)}") from None
        if not str(err).startswith("Does not validate against any of the Union subtypes"):
            raise
        raise RecipeError(describe_config_error(str(err), argv)) from None
    finally:
        sys.argv = saved_argv


def _build_cli(argv: List[str], other_commands: List[str], cli_class: type = FineGrainedCLI) -> FineGrainedCLI:
    others = " | ".join(other_commands)
    return cli_class(
        FineGrainedClassifier,
        LightningDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": "The finegrained command: fit | validate | test | predict (LightningCLI, "
                       "below)" + (f"; also {others} (see finegrained <command> --help)" if others else "") + "."},
        recipe_paths=[p for p in _config_paths(argv) if os.path.isfile(p)],
        command_line=argv,
    )
