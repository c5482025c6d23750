"""``finegrained export`` and ``finegrained predict-images``: trained checkpoints to artifacts, artifacts to predictions."""
from __future__ import annotations

import argparse
import os
from typing import List

from finegrained.cli.data import datamodule_from_config


RUNS_CSV = "results/runs.csv"


def export_command(argv: List[str]) -> int:
    from finegrained.export import export_classifier

    parser = argparse.ArgumentParser(prog="finegrained export",
                                     description="Export a trained checkpoint to ONNX or TorchScript, with a JSON "
                                                 "manifest (class names, preprocessing, sha256), or (--format hf) to "
                                                 "a Hugging Face Hub folder: config.json, model.safetensors and a "
                                                 "model card with the run record's accuracy.")
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint (.ckpt)")
    parser.add_argument("--format", choices=["onnx", "torchscript", "hf"], default="onnx")
    parser.add_argument("--out", required=True, help="output file (.onnx or .pt); for hf a new or empty folder, or "
                                                     "a previous hf export (replaced)")
    parser.add_argument("--runs-csv", default=RUNS_CSV,
                        help="hf: the run records finegrained test wrote; the newest softmax record of --ckpt gives "
                             "the card's accuracy")
    parser.add_argument("--run-id", default=None, help="hf: the record to cite instead (its run_id)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--config", default=None,
                        help="recipe whose data: section gives validation images for the checks "
                             "(default: random inputs)")
    parser.add_argument("--val-batches", type=int, default=2, help="validation batches used with --config")
    args = parser.parse_args(argv)
    images = _validation_images(args.config, args.val_batches) if args.config else None
    if args.format == "hf":
        return _export_hub_folder(args, images)
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


def _export_hub_folder(args, images) -> int:
    from finegrained.export_hub import export_hub_folder
    from finegrained.results.runs import checkpoint_record

    quiet_default = args.runs_csv == RUNS_CSV and args.run_id is None and not os.path.isfile(RUNS_CSV)
    evaluation = None if quiet_default else checkpoint_record(args.ckpt, args.runs_csv, args.run_id)
    written = export_hub_folder(args.ckpt, args.out, evaluation=evaluation, images=images)
    config = written["config"]
    evaluation = config.get("evaluation")
    print(f"wrote {args.out} (config.json, model.safetensors, README.md; {len(config['class_names'])} classes, "
          f"max |loaded - checkpoint| logits = {written['parity_max_abs_diff']:.2e})")
    if evaluation:
        print(f"model card: top-1 {float(evaluation['top1']):.4f} from run {evaluation['run_id']} of {args.runs_csv}")
    else:
        print(f"model card: no record of finegrained test for {args.ckpt} in {args.runs_csv}; the card states no "
              f"accuracy")
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


def predict_images_command(argv: List[str]) -> int:
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
    return 2 if failures else 0  # bad input: each unreadable image had its error line, the others were predicted
