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

This is the one place where model and data meet: the DataModule's ``num_classes``,
``class_names`` and ``preprocessing`` are linked into the model's hyper-parameters, so every
checkpoint knows how to name its outputs and prepare its inputs.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List, Optional

import torch
from pytorch_lightning import LightningDataModule
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from finegrained.model import FineGrainedClassifier
from finegrained.recipe import config_hash, expand_config_args, load_recipe
from finegrained.resume import AtomicCheckpointIO, RandomState
from finegrained.runs import RunArtifacts, append_run, device_name, git_commit


class FineGrainedCLI(LightningCLI):
    """LightningCLI with a best/last checkpoint callback and the data -> model links."""

    def __init__(self, *args, recipe_paths: Optional[List[str]] = None, **kwargs):
        self.recipe_paths = recipe_paths or []
        self._test_started = 0.0
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--runs_csv", default="results/runs.csv",
                            help="CSV file that every test run appends its record to ('' to skip)")
        parser.add_lightning_class_args(RunArtifacts, "run_artifacts")
        parser.add_lightning_class_args(RandomState, "random_state")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
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
        return super().instantiate_trainer(**kwargs)

    def before_instantiate_classes(self) -> None:
        sub = self.config.get("subcommand")
        if not sub:
            return
        cfg = self.config[sub]
        # A checkpoint holds every weight: do not fetch ImageNet weights just to overwrite them.
        if sub in ("validate", "test", "predict") and cfg.get("ckpt_path"):
            cfg.model.backbone_weights = None
        # Lightning skips checkpoints under fast_dev_run except save_last at on_train_end, which
        # would overwrite a real run's last.ckpt (same dirpath in the recipe) with a one-batch model.
        if sub == "fit" and cfg.get("trainer", {}).get("fast_dev_run") and cfg.get("checkpoint"):
            cfg.checkpoint.save_last = False

    def after_test(self) -> None:
        metrics = self.trainer.callback_metrics
        if "test_top1" in metrics and self.trainer.is_global_zero:
            parts = [f"top-1 {float(metrics['test_top1']):.4f}"]
            if "test_top5" in metrics:
                parts.append(f"top-5 {float(metrics['test_top5']):.4f}")
            parts.append(f"mean per-class {float(metrics['test_mean_class_acc']):.4f}")
            n = len(self.trainer.test_dataloaders.dataset) if self.trainer.test_dataloaders is not None else "?"
            print(f"Test accuracy on {n} images: " + ", ".join(parts))
            self._record_run(metrics)

    def _record_run(self, metrics) -> None:
        cfg = self.config["test"]
        if not cfg.get("runs_csv"):
            return
        model, datamodule = self.model, self.datamodule
        ckpt_path = cfg.get("ckpt_path")
        epochs, train_wall = self.trainer.current_epoch, None
        if ckpt_path and os.path.isfile(ckpt_path):
            checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
            epochs = checkpoint.get("epoch", -1) + 1
            for key, state in checkpoint.get("callbacks", {}).items():
                if key.startswith("RunArtifacts"):
                    train_wall = state.get("train_wall_s")
        hashed = {k: v for k, v in cfg.as_dict().items() if k not in ("ckpt_path", "config", "runs_csv")}
        artifacts = next((c for c in self.trainer.callbacks if isinstance(c, RunArtifacts)), None)
        record = {
            "git_commit": git_commit(),
            "recipe": ";".join(self.recipe_paths),
            "config_hash": config_hash(hashed),
            "dataset": getattr(datamodule, "dataset_name", type(datamodule).__name__),
            "method": model.hparams.head,
            "backbone": model.hparams.backbone,
            "head_dim": model.head.output_dim,
            "epochs": epochs,
            "top1": float(metrics["test_top1"]),
            "top5": float(metrics["test_top5"]) if "test_top5" in metrics else "",
            "mean_class_acc": float(metrics["test_mean_class_acc"]),
            "train_wall_s": "" if train_wall is None else round(float(train_wall), 1),
            "test_wall_s": round(artifacts.test_wall_s, 1) if artifacts else "",
            "device": device_name(self.trainer),
            "checkpoint": ckpt_path or "",
            "plots": ";".join(artifacts.plots) if artifacts else "",
        }
        row = append_run(cfg.runs_csv, record)
        print(f"Recorded run {row['run_id']} in {cfg.runs_csv}")

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        # Checkpoints are only ever unpickled as plain tensors and containers.
        if "weights_only" in self._subcommand_method_arguments[subcommand] and kwargs.get("weights_only") is None:
            kwargs["weights_only"] = True
        return kwargs


def _config_paths(argv: List[str]) -> List[str]:
    paths = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    return paths + [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]


def run_lightning_cli(args: Optional[List[str]] = None) -> FineGrainedCLI:
    argv = list(sys.argv[1:] if args is None else args)
    # LightningCLI reads sys.argv; give it the expanded recipes there (passing them as ``args``
    # besides a different sys.argv makes it warn about a possible mistake).
    saved_argv, sys.argv = sys.argv, [sys.argv[0] if sys.argv else "finegrained"] + expand_config_args(argv)
    try:
        return _build_cli(argv)
    finally:
        sys.argv = saved_argv


def _build_cli(argv: List[str]) -> FineGrainedCLI:
    return FineGrainedCLI(
        FineGrainedClassifier,
        LightningDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": __doc__.split("\n\n")[0]
                       + " Also: finegrained export | predict-images | data | tables | bench | bench-table (see finegrained <cmd> --help)."},
        recipe_paths=[p for p in _config_paths(argv) if os.path.isfile(p)],
    )


# ----------------------------------------------------------------------------- tools
def _export_main(argv: List[str]) -> int:
    from finegrained.export import export_classifier

    parser = argparse.ArgumentParser(prog="finegrained export",
                                     description="Export a trained checkpoint to ONNX or TorchScript, "
                                                 "with a JSON manifest (class names, preprocessing, sha256).")
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint (.ckpt)")
    parser.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    parser.add_argument("--out", required=True, help="output file (.onnx or .pt)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--config", default=None,
                        help="recipe whose data: section gives validation images for the checks "
                             "(default: random inputs)")
    parser.add_argument("--val-batches", type=int, default=2, help="validation batches used with --config")
    args = parser.parse_args(argv)
    images = _validation_images(args.config, args.val_batches) if args.config else None
    manifest = export_classifier(args.ckpt, args.format, args.out, opset=args.opset, images=images)
    print(f"wrote {args.out} ({manifest['format']}, {len(manifest['class_names'])} classes, "
          f"max |export - torch| = {manifest['parity_max_abs_diff']:.2e})")
    substitute = manifest.get("eig_substitute")
    if substitute:
        print(f"eigendecomposition substitute: {substitute['description']}")
        print(f"  max |substitute - eig| on {substitute['measured_on']}: logits {substitute['logits_max_abs_error']:.2e}, "
              f"head features {substitute['features_max_abs_error']:.2e} (largest feature {substitute['features_max_abs']:.2e})")
        print(f"  max |{manifest['format']} artifact - eig model| logits: "
              f"{substitute['artifact_vs_eig_logits_max_abs_error']:.2e}")
    print(f"wrote {manifest['manifest_path']}")
    return 0


def _validation_images(config_path: str, batches: int):
    import torch

    datamodule = datamodule_from_config(config_path)
    datamodule.prepare_data()
    datamodule.setup("validate")
    loader = datamodule.val_dataloader()
    images = []
    for k, (batch, _) in enumerate(loader):
        if k >= batches:
            break
        images.append(batch)
    return torch.cat(images)


def _predict_images_main(argv: List[str]) -> int:
    from finegrained.predict import predict_images

    parser = argparse.ArgumentParser(prog="finegrained predict-images",
                                     description="Top-k classes per image from an exported model.")
    parser.add_argument("--model", required=True, help="exported .onnx or TorchScript file (with its .json manifest)")
    parser.add_argument("inputs", nargs="+", metavar="IMG_OR_DIR", help="image files or folders (searched recursively)")
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--csv", default=None, help="also write the predictions to this CSV file")
    args = parser.parse_args(argv)
    _, failures = predict_images(args.model, args.inputs, topk=args.topk, batch_size=args.batch_size,
                                 csv_path=args.csv)
    return 1 if failures else 0


def datamodule_from_config(config_path: str) -> LightningDataModule:
    """Instantiate the ``data:`` section of a LightningCLI recipe."""
    from jsonargparse import ArgumentParser

    config = load_recipe(config_path)
    if "data" not in config:
        raise ValueError(f"{config_path} has no 'data:' section")
    parser = ArgumentParser()
    parser.add_subclass_arguments(LightningDataModule, "data")
    cfg = parser.parse_object({"data": config["data"]})
    return parser.instantiate(cfg).data


def _data_main(argv: List[str]) -> int:
    from datamodules.samples import save_samples

    parser = argparse.ArgumentParser(prog="finegrained data", description="Dataset tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    samples = sub.add_parser("samples", help="write a few images of a split as PNG files, named by class")
    samples.add_argument("--config", required=True, help="recipe whose data: section to use")
    samples.add_argument("--split", choices=["train", "val", "test"], default="test")
    samples.add_argument("--n", type=int, default=8)
    samples.add_argument("--out", required=True)
    verify = sub.add_parser("verify", help="decode every image; print counts per split and class; list problems")
    verify.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    verify.add_argument("--root", required=True, help="dataset folder (or the folder holding it); image root for csv")
    verify.add_argument("--annotation-level", default="variant", help="aircraft: variant, family or manufacturer")
    verify.add_argument("--layout", default="auto", help="cars: auto, original, kaggle_nested or kaggle_folders")
    verify.add_argument("--train-csv")
    verify.add_argument("--val-csv")
    verify.add_argument("--test-csv")
    args = parser.parse_args(argv)
    if args.command == "verify":
        return _verify(args)
    datamodule = datamodule_from_config(args.config)
    datamodule.prepare_data()
    datamodule.setup("test")
    dataset = getattr(datamodule, f"{args.split}_dataset")
    for path in save_samples(dataset, args.out, args.n):
        print(path)
    return 0


DATASETS = {"cub": "CUB200DataModule", "aircraft": "FGVCAircraftDataModule", "cars": "StanfordCarsDataModule",
            "csv": "CSVDataModule", "folder": "ImageFolderDataModule"}


def _verify(args) -> int:
    import datamodules
    from datamodules.verify import verify_datamodule

    cls = getattr(datamodules, DATASETS[args.dataset])
    common = {"num_workers": 0}
    if args.dataset == "csv":
        if not (args.train_csv and args.test_csv):
            raise SystemExit("finegrained data verify --dataset csv needs --train-csv and --test-csv")
        datamodule = cls(args.root, args.train_csv, args.test_csv, val_csv=args.val_csv, **common)
    elif args.dataset == "aircraft":
        datamodule = cls(args.root, annotation_level=args.annotation_level, **common)
    elif args.dataset == "cars":
        datamodule = cls(args.root, layout=args.layout, **common)
    else:
        datamodule = cls(args.root, **common)
    return 1 if verify_datamodule(datamodule) else 0


def _tables_main(argv: List[str]) -> int:
    from finegrained.plots import plot_accuracy_vs_dim
    from finegrained.runs import read_runs
    from finegrained.tables import accuracy_vs_dim_points, load_reference, select_runs, write_tables

    parser = argparse.ArgumentParser(prog="finegrained tables",
                                     description="Regenerate results/tables/*.md and *.tex: the seed's numbers "
                                                 "beside ours from the run records.")
    parser.add_argument("--reference", default="results/reference.csv")
    parser.add_argument("--runs-csv", default="results/runs.csv", help="run records written by finegrained test")
    parser.add_argument("--runs", default="latest",
                        help="which runs count: latest (per recipe), best (per recipe), all (mean), or run ids a,b,c")
    parser.add_argument("--out", default="results/tables")
    parser.add_argument("--plots", action="store_true", help="also draw accuracy versus representation dimension")
    args = parser.parse_args(argv)
    reference = load_reference(args.reference)
    runs = select_runs(read_runs(args.runs_csv), args.runs)
    paths = write_tables(reference, runs, args.out)
    with open(os.path.join(args.out, "finegrained.md")) as f:
        print(f.read())
    print(f"{len(runs)} run(s) from {args.runs_csv} ({args.runs}); wrote {len(paths)} files under {args.out}/")
    if args.plots:
        path = plot_accuracy_vs_dim(accuracy_vs_dim_points(reference, runs), os.path.join(args.out, "accuracy_vs_dim.png"))
        print(f"wrote {path}")
    return 0


def _bench_table_main(argv: List[str]) -> int:
    from finegrained.bench_table import bench_table
    from finegrained.heads import available_heads

    parser = argparse.ArgumentParser(prog="finegrained bench-table",
                                     description="Every head on Fashion-MNIST with a frozen EfficientNet-Lite0, on a CPU.")
    parser.add_argument("--heads", default="all", help="comma-separated head names, or all")
    parser.add_argument("--per-class", type=int, default=150, help="training images per class")
    parser.add_argument("--test-per-class", type=int, default=100, help="test images per class (official test set)")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--channels", type=int, default=64, help="PCA channels of the cached feature maps")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of the heads trained with Lightning")
    parser.add_argument("--cache-dir", default=None, help="feature cache (default: $FINEGRAINED_DATA/bench_table)")
    parser.add_argument("--out", default="results/tables/bench_fashion_mnist", help="output path without extension")
    args = parser.parse_args(argv)
    heads = available_heads() if args.heads == "all" else [h.strip() for h in args.heads.split(",") if h.strip()]
    bench_table(heads, per_class=args.per_class, test_per_class=args.test_per_class, image_size=args.image_size,
                channels=args.channels, epochs=args.epochs, cache_dir=args.cache_dir, out=args.out)
    return 0


def _bench_main(argv: List[str]) -> int:
    from finegrained import bench

    parser = argparse.ArgumentParser(prog="finegrained bench",
                                     description="Medians over repeats, with ratios against baselines timed in the same run.")
    sub = parser.add_subparsers(dest="command", required=True)
    heads = sub.add_parser("heads", help="FP+BP of the second-order heads against their baselines")
    heads.add_argument("--quick", action="store_true", help="correctness only (small sizes, no timings): for CI")
    heads.add_argument("--batch", type=int, default=8)
    heads.add_argument("--channels", type=int, default=256)
    heads.add_argument("--sides", default="28,14", help="map sides, comma-separated")
    loader = sub.add_parser("loader", help="decode + transforms of 1600x1067 JPEGs to 448 crops, per core")
    loader.add_argument("--images", type=int, default=24)
    loader.add_argument("--folder", default=None, help="where the sample JPEGs are written (default: a cache folder)")
    step = sub.add_parser("step", help="training-step images/s of backbone + head against backbone + GAP")
    step.add_argument("--backbone", default="resnet50")
    step.add_argument("--head", default="isqrt")
    step.add_argument("--size", type=int, default=448)
    step.add_argument("--batch", type=int, default=2)
    for p in (heads, loader, step):
        p.add_argument("--repeats", type=int, default=9 if p is heads else 5 if p is loader else 7)
        p.add_argument("--device", default="auto", help="cpu, cuda or auto (CUDA when present, the CPU too)")
        p.add_argument("--threads", type=int, default=2, help="CPU threads (the published setting: 2)")
        p.add_argument("--out", default="results/bench")
    args = parser.parse_args(argv)
    sides = [int(s) for s in args.sides.split(",")] if args.command == "heads" else []
    torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")]
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        devices = ([] if args.device == "cuda" else devices) + [torch.device("cuda")]
    if args.command == "heads":
        rows = bench.check_parity(devices[-1] if args.quick else torch.device("cpu"))
        print(bench.format_rows(rows))
        print("parity: every optimised path matches its baseline")
        if args.quick:
            return 0
    for device in devices:
        gpu = device.type == "cuda"
        if args.command == "heads":
            if gpu:
                print(bench.format_rows(bench.check_parity(device)))
            rows = bench.bench_heads(device, args.repeats, args.batch, args.channels, sides)
            if gpu:
                print(bench.format_rows(rows))  # the published GPU setting: bf16 autocast, matrix functions in float32
                bf16 = bench.bench_heads(device, args.repeats, args.batch, args.channels, sides, autocast=True)
                for row in bf16:
                    row["case"] += " [bf16 autocast]"
                rows += bf16
                for side in sides:
                    t = {r["case"]: r["median_ms"] for r in rows if r["map"] == f"{side}x{side}"}
                    print(f"{side}x{side}: isqrt / mpncov FP+BP time = "
                          f"{t['isqrt (fused Function)'] / t['mpncov (K-matrix Function)']:.3f}")
        elif args.command == "loader":
            if gpu:
                continue
            folder = args.folder or os.path.join(os.path.expanduser("~"), ".cache", "finegrained", "bench_jpegs")
            rows = bench.bench_loader(folder, args.images, args.repeats)
        else:
            rows = bench.bench_step(device, args.backbone, args.head, args.size, args.batch, args.repeats,
                                    autocast=gpu)
        print(f"\n## bench {args.command} on {device} ({torch.get_num_threads()} CPU threads)\n")
        print(bench.format_rows(rows))
        print(f"wrote {bench.write_csv(rows, args.command, device, args.out)}")
    return 0


TOOLS: Dict[str, Callable[[List[str]], int]] = {
    "bench": _bench_main,
    "tables": _tables_main,
    "bench-table": _bench_table_main,
    "export": _export_main,
    "predict-images": _predict_images_main,
    "data": _data_main,
}


def main(argv: Optional[List[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in TOOLS:
        return TOOLS[args[0]](args[1:])
    run_lightning_cli(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
