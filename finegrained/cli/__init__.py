"""The ``finegrained`` command.

Training and evaluation go through LightningCLI with YAML recipes::

    finegrained fit      --config recipes/demo.yaml [--trainer.max_epochs 5 ...]
    finegrained validate --config recipes/demo.yaml --ckpt_path CKPT
    finegrained test     --config recipes/demo.yaml --ckpt_path CKPT
    finegrained predict  --config recipes/demo.yaml --ckpt_path CKPT

Tools around trained models and data::

    finegrained export --ckpt CKPT --format onnx|torchscript --out FILE
    finegrained predict-images --model FILE IMG_OR_DIR... [--topk 5] [--csv OUT.csv]
    finegrained data samples --config RECIPE --split test --n 8 --out DIR
    finegrained tables [--runs latest|best|all|ID,...] [--plots]
    finegrained bench-table [--heads all] [--epochs 10]
    finegrained bench heads|loader|step [--quick]

One module per command family: :mod:`~finegrained.cli.train` (LightningCLI), :mod:`~finegrained.cli.export`
(export, predict-images), :mod:`~finegrained.cli.data`, :mod:`~finegrained.cli.results` (tables) and
:mod:`~finegrained.cli.bench` (bench, bench-table).
"""
from __future__ import annotations

import sys
from typing import Callable, Dict, List, Optional

from finegrained.cli.bench import bench_command, bench_table_command
from finegrained.cli.data import data_command, datamodule_from_config
from finegrained.cli.export import export_command, predict_images_command
from finegrained.cli.results import tables_command
from finegrained.cli.train import FineGrainedCLI, run_lightning_cli

__all__ = ["main", "FineGrainedCLI", "run_lightning_cli", "datamodule_from_config"]


TOOLS: Dict[str, Callable[[List[str]], int]] = {
    "bench": bench_command,
    "tables": tables_command,
    "bench-table": bench_table_command,
    "export": export_command,
    "predict-images": predict_images_command,
    "data": data_command,
}


def main(argv: Optional[List[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in TOOLS:
        return TOOLS[args[0]](args[1:])
    run_lightning_cli(argv)
    return 0
