"""The ``finegrained`` command.

Training and evaluation go through LightningCLI with YAML recipes::

    finegrained fit      --config recipes/demo.yaml [--trainer.max_epochs 5 ...]
    finegrained validate --config recipes/demo.yaml --ckpt_path CKPT
    finegrained test     --config recipes/demo.yaml --ckpt_path CKPT
    finegrained predict  --config recipes/demo.yaml --ckpt_path CKPT

Tools around trained models and data::

    finegrained export --ckpt CKPT --format onnx|torchscript|hf --out FILE_OR_FOLDER
    finegrained serve --model HF_FOLDER_OR_EXPORT [--port 8000] [--max_batch_size 16] [--workers N]
    finegrained predict-images --model FILE IMG_OR_DIR... [--topk 5] [--csv OUT.csv]
    finegrained data samples --config RECIPE --split test --n 8 --out DIR
    finegrained tables [--runs latest|best|all|ID,...] [--modified mark|hide] [--plots]
    finegrained report --ckpt CKPT [--config RECIPE] [--split test] --out DIR
    finegrained bench-table [--heads all] [--epochs 10]
    finegrained bench heads|loader|step [--quick]

Campaigns of recipes × seeds on a SLURM cluster (submitit) or on this machine::

    finegrained launch RECIPE... --out CAMPAIGN_DIR [--executor slurm|local] [--seeds 0 1 2] [...]
    finegrained launch status CAMPAIGN_DIR
    finegrained launch collect CAMPAIGN_DIR

One module per command family: :mod:`~finegrained.cli.train` (LightningCLI), :mod:`~finegrained.cli.export`
(export, predict-images), :mod:`~finegrained.cli.data`, :mod:`~finegrained.cli.results` (tables, report),
:mod:`~finegrained.cli.bench` (bench, bench-table), :mod:`~finegrained.cli.launch` (launch) and
:mod:`~finegrained.cli.serve` (serve).
"""
from __future__ import annotations

import difflib
import logging
import os
import re
import signal
import sys
from typing import Callable, Dict, List, Optional

import yaml
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning.utilities.exceptions import SIGTERMException

from finegrained.cli.bench import bench_command, bench_table_command
from finegrained.cli.data import data_command, datamodule_from_config
from finegrained.cli.export import export_command, predict_images_command
from finegrained.cli.launch import launch_command
from finegrained.cli.results import report_command, tables_command
from finegrained.cli.serve import serve_command
from finegrained.cli.train import FineGrainedCLI, run_lightning_cli

from finegrained.backbones import WeightsUnavailableError

__all__ = ["main", "entry_point", "FineGrainedCLI", "run_lightning_cli", "datamodule_from_config"]

# Bad input: a wrong path or layout, an unreadable file or image, a value out of range, a checkpoint or
# weights that do not fit, a broken recipe. Other exceptions are programming errors and keep their traceback.
BAD_INPUT = (OSError, ValueError, WeightsUnavailableError, MisconfigurationException, yaml.YAMLError)
DEBUG_ENVIRONMENT = "FINEGRAINED_DEBUG"


TRAINING_COMMANDS = ("fit", "validate", "test", "predict")  # LightningCLI's subcommands
TOOLS: Dict[str, Callable[[List[str]], int]] = {
    "bench": bench_command,
    "tables": tables_command,
    "report": report_command,
    "bench-table": bench_table_command,
    "export": export_command,
    "predict-images": predict_images_command,
    "data": data_command,
    "launch": launch_command,
    "serve": serve_command,
}


class _FirstProcess(logging.Filter):
    """Messages of the first process only (under DDP every process runs the same DataModule code)."""

    def filter(self, record: Optional[logging.LogRecord]) -> bool:
        from lightning_fabric.utilities.rank_zero import rank_zero_only

        return getattr(rank_zero_only, "rank", 0) == 0


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a message comes (a redirect set later is honoured)."""

    finegrained_messages = True

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


class _MessageFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


def show_package_messages() -> None:
    """Print the ``datamodules`` and ``finegrained`` loggers' messages (info and up) on stderr, as Lightning's own:
    which split validates, what a hold-out took, which files were skipped. Python's default shows none of the
    info messages and prints warnings without saying where they come from."""
    for name in ("datamodules", "finegrained"):
        logger = logging.getLogger(name)
        if any(getattr(h, "finegrained_messages", False) for h in logger.handlers):
            continue
        handler = _StderrHandler()
        handler.setFormatter(_MessageFormatter())
        handler.addFilter(_FirstProcess())
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def main(argv: Optional[List[str]] = None) -> int:
    """Run one command; exceptions propagate (for use from Python; the command line uses :func:`entry_point`)."""
    args = list(sys.argv[1:] if argv is None else argv)
    show_package_messages()
    if args[:1] == ["--version"]:
        from finegrained import __version__
        print(f"finegrained {__version__}")
        return 0
    if args and args[0] in TOOLS:
        return TOOLS[args[0]](args[1:])
    if args and not args[0].startswith("-") and args[0] not in TRAINING_COMMANDS:
        commands = list(TRAINING_COMMANDS) + list(TOOLS)
        close = difflib.get_close_matches(args[0], commands, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ValueError(f"the command line: no command {args[0]!r}{hint}; the commands are {', '.join(commands)}")
    try:
        run_lightning_cli(args, other_commands=list(TOOLS))
    except SIGTERMException:
        # Lightning ends a run stopped by SIGTERM with SystemExit(None), status 0: a scheduler or script would take
        # the unfinished run for a finished one. The status of a process killed by SIGTERM says what happened.
        if _FirstProcess().filter(None):  # once, not per rank
            advice = "; continue with --ckpt_path last" if args[0] == "fit" else ""
            print(f"finegrained {args[0]}: stopped by SIGTERM before the end{advice}", file=sys.stderr)
        return 128 + signal.SIGTERM
    return 0


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line; for an error re-raised from a DataLoader worker, its original message;
    for a YAML syntax error, ``<file>: line N, column M: <problem>``."""
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        return f"{mark.name}: line {mark.line + 1}, column {mark.column + 1}: {error.problem} (YAML syntax)"
    text = str(error)
    if "Original Traceback" in text:
        text = re.sub(r"^[\w.]+: ", "", text.strip().splitlines()[-1], count=1)
    return " ".join(part.strip() for part in text.splitlines() if part.strip()) or type(error).__name__


def entry_point(argv: Optional[List[str]] = None) -> int:
    """The ``finegrained`` command: :func:`main`, with bad input reported as the single line
    ``error: <message>`` on stderr and exit status 2. ``--debug`` (or ``FINEGRAINED_DEBUG=1``) shows the traceback."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get(DEBUG_ENVIRONMENT, "") not in ("", "0")
    args = [a for a in args if a != "--debug"]
    try:
        return main(args)
    except BAD_INPUT as error:
        if debug:
            raise
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
