"""``finegrained data samples | verify``: look at a dataset before training on it."""
from __future__ import annotations

import argparse
import functools
import os
from typing import List

from pytorch_lightning import LightningDataModule

from finegrained.cli.recipe import load_recipe


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


def data_command(argv: List[str]) -> int:
    from datamodules.samples import save_samples
    from finegrained.results.output_folder import owned_output

    parser = argparse.ArgumentParser(prog="finegrained data", description="Dataset tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    samples = sub.add_parser("samples", help="write a few images of a split as PNG files, named by class")
    samples.add_argument("--config", required=True, help="recipe whose data: section to use")
    samples.add_argument("--split", choices=["train", "val", "test"], default="test")
    samples.add_argument("--n", type=int, default=8)
    samples.add_argument("--out", required=True, help="a new or empty folder, or one a previous data samples wrote "
                                                      "(its samples are replaced)")
    samples.add_argument("--by-class", action="store_true",
                         help="write a labelled folder OUT/<class>/NNNN.png (predict-images then reports accuracy)")
    verify = sub.add_parser("verify", help="decode every image; print counts per split and class; list problems")
    verify.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    verify.add_argument("--root", required=True, help="dataset folder (or the folder holding it); image root for csv")
    verify.add_argument("--annotation-level", default="variant", help="aircraft: variant, family or manufacturer")
    verify.add_argument("--layout", default="auto", help="cars: auto, original, kaggle_nested, kaggle_folders or combined")
    verify.add_argument("--version", default="2021_mini", help="inaturalist: 2017, 2018, 2021 or 2021_mini")
    verify.add_argument("--train-csv")
    verify.add_argument("--val-csv")
    verify.add_argument("--test-csv")
    shard = sub.add_parser("shard", help="write a dataset as WebDataset tar shards (resized JPEG + label) for "
                                         "ShardDataModule")
    shard.add_argument("--config", help="recipe whose data: section to shard (or --dataset and --root)")
    shard.add_argument("--dataset", choices=sorted(DATASETS))
    shard.add_argument("--root")
    shard.add_argument("--version", default="2021_mini", help="inaturalist: 2017, 2018, 2021 or 2021_mini")
    shard.add_argument("--out", required=True)
    shard.add_argument("--size", type=int, default=512, help="shorter side of the stored images")
    shard.add_argument("--shard-size", type=int, default=1000, help="samples per tar file")
    shard.add_argument("--overwrite", action="store_true",
                       help="replace a previous shard output in --out (only the files its index.json lists; a folder "
                            "holding anything else is refused)")
    args = parser.parse_args(argv)
    if args.command == "verify":
        return _verify(args)
    if args.command == "shard":
        from datamodules.shards import shard_counts, write_shards

        if args.config:
            datamodule = datamodule_from_config(args.config)
        elif args.dataset and args.root:
            datamodule = _datamodule(args)
        else:
            raise ValueError("finegrained data shard needs --config RECIPE, or --dataset NAME and --root DIR")
        datamodule.prepare_data()
        path = write_shards(datamodule, args.out, size=args.size, shard_size=args.shard_size, overwrite=args.overwrite)
        counts = ", ".join(f"{split} {n}" for split, n in shard_counts(args.out).items())
        print(f"wrote {path} ({counts} images); read them with datamodules.ShardDataModule(root={args.out!r})")
        return 0
    datamodule = datamodule_from_config(args.config)
    datamodule.prepare_data()
    datamodule.setup("test")
    dataset = getattr(datamodule, f"{args.split}_dataset")
    # A folder of the user's is refused; samples written before are replaced, never mixed with the new ones.
    with owned_output(args.out, "samples") as staging:
        written = [os.path.relpath(p, staging) for p in save_samples(dataset, staging, args.n, by_class=args.by_class)]
    for path in written:
        print(os.path.join(args.out, path))
    return 0


DATASETS = {"cub": "CUB200DataModule", "aircraft": "FGVCAircraftDataModule", "cars": "StanfordCarsDataModule",
            "nabirds": "NABirdsDataModule", "dogs": "StanfordDogsDataModule", "flowers102": "Flowers102DataModule",
            "pets": "OxfordIIITPetDataModule", "food101": "Food101DataModule", "inaturalist": "INaturalistDataModule",
            "csv": "CSVDataModule", "folder": "ImageFolderDataModule"}


def _verify(args) -> int:
    from datamodules.verify import verify_datamodule

    return 1 if verify_datamodule(_datamodule(args)) else 0


def _datamodule(args):
    """The DataModule ``--dataset`` names, at ``--root``, with the dataset-specific options."""
    import datamodules

    cls = getattr(datamodules, DATASETS[args.dataset])
    common = {"num_workers": 0}
    option = functools.partial(getattr, args)
    if args.dataset == "csv":
        if not (option("train_csv", None) and option("test_csv", None)):
            raise SystemExit("finegrained data verify --dataset csv needs --train-csv and --test-csv")
        datamodule = cls(args.root, args.train_csv, args.test_csv, val_csv=args.val_csv, **common)
    elif args.dataset == "aircraft":
        datamodule = cls(args.root, annotation_level=option("annotation_level", "variant"), **common)
    elif args.dataset == "cars":
        datamodule = cls(args.root, layout=option("layout", "auto"), **common)
    elif args.dataset == "inaturalist":
        datamodule = cls(args.root, version=args.version, **common)
    else:
        datamodule = cls(args.root, **common)
    return datamodule
