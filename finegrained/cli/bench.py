"""``finegrained bench heads | loader | step`` and ``finegrained bench-table``."""
from __future__ import annotations

import argparse
import os
import sys
from typing import List

import torch


def bench_table_command(argv: List[str]) -> int:
    from finegrained.bench.table import bench_table
    from finegrained.heads import available_heads

    parser = argparse.ArgumentParser(prog="finegrained bench-table",
                                     description="Every head on Fashion-MNIST with a frozen EfficientNet-Lite0, on a CPU.")
    parser.add_argument("--heads", default="all", help="comma-separated head names, or all")
    parser.add_argument("--per-class", type=int, default=150, help="training images per class")
    parser.add_argument("--val-per-class", type=int, default=30,
                        help="validation images per class (further official training images): what each head chooses")
    parser.add_argument("--test-per-class", type=int, default=100, help="test images per class (official test set)")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--channels", type=int, default=64, help="PCA channels of the cached feature maps")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of the heads trained with Lightning")
    parser.add_argument("--cache-dir", default=None, help="feature cache (default: $FINEGRAINED_DATA/bench_table)")
    parser.add_argument("--out", default="results/tables/bench_fashion_mnist", help="output path without extension")
    args = parser.parse_args(argv)
    heads = available_heads() if args.heads == "all" else [h.strip() for h in args.heads.split(",") if h.strip()]
    bench_table(heads, per_class=args.per_class, test_per_class=args.test_per_class, image_size=args.image_size,
                channels=args.channels, epochs=args.epochs, cache_dir=args.cache_dir, out=args.out,
                val_per_class=args.val_per_class)
    return 0


def bench_command(argv: List[str]) -> int:
    from finegrained.bench.heads import bench_heads, check_parity, time_ratio
    from finegrained.bench.loader import bench_loader
    from finegrained.bench.step import DEFAULT_BACKBONES, DEFAULT_HEADS, bench_step
    from finegrained.bench.timing import format_rows, write_csv
    from finegrained.ops.isqrt import isqrt_backward_route

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
    step.add_argument("--backbone", default=",".join(DEFAULT_BACKBONES),
                      help="comma-separated backbones (names of finegrained.backbones, timm/<model>)")
    step.add_argument("--head", default=",".join(DEFAULT_HEADS), help="comma-separated heads, each timed beside GAP")
    step.add_argument("--size", type=int, default=448)
    step.add_argument("--batch", type=int, default=2)
    serve = sub.add_parser("serve", help="latency and throughput of finegrained serve under load, batching off and on")
    serve.add_argument("--model", required=True, help="a folder of finegrained export --format hf, or an export")
    serve.add_argument("--images", required=True, help="a folder of images to send (the first 64)")
    serve.add_argument("--requests", type=int, default=200)
    serve.add_argument("--clients", type=int, default=8, help="concurrent clients")
    serve.add_argument("--max_batch_size", type=int, default=16, help="the batched setting's batch size")
    serve.add_argument("--batch_timeout", type=float, default=0.01)
    serve.add_argument("--malformed", type=float, default=0.1, help="share of bad requests mixed in (must get 4xx)")
    serve.add_argument("--workers", type=int, default=1)
    serve.add_argument("--serve_device", default="cpu", choices=["cpu", "cuda", "auto"])
    serve.add_argument("--requests_csv", default=None, help="also write every request (kind, status, latency) here")
    serve.add_argument("--out", default="results/bench")
    for p in (heads, loader, step):
        p.add_argument("--repeats", type=int, default=9 if p is heads else 5 if p is loader else 7)
        p.add_argument("--device", default="auto", help="cpu, cuda or auto (CUDA when present, the CPU too)")
        p.add_argument("--threads", type=int, default=2, help="CPU threads (the published setting: 2)")
        p.add_argument("--out", default="results/bench")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _bench_serve(args)
    sides = [int(s) for s in args.sides.split(",")] if args.command == "heads" else []
    torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")]
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        devices = ([] if args.device == "cuda" else devices) + [torch.device("cuda")]
    if args.command == "heads":
        rows = check_parity(devices[-1] if args.quick else torch.device("cpu"))
        print(format_rows(rows))
        print("parity: every optimised path matches its baseline")
        if args.quick:
            return 0
    for device in devices:
        gpu = device.type == "cuda"
        if args.command == "heads":
            if gpu:
                print(format_rows(check_parity(device)))
            rows = bench_heads(device, args.repeats, args.batch, args.channels, sides)
            print(f"isqrt head's backward on {device.type}: {isqrt_backward_route(device)} "
                  "(finegrained.ops.isqrt.isqrt_backward_route)")
            if gpu:
                print(format_rows(rows))  # the published GPU setting: bf16 autocast, matrix functions in float32
                bf16 = bench_heads(device, args.repeats, args.batch, args.channels, sides, autocast=True)
                for row in bf16:
                    row["case"] += " [bf16 autocast]"
                rows += bf16
                for side in sides:
                    print(f"{side}x{side}: isqrt / mpncov FP+BP time = "
                          f"{time_ratio(rows, side, 'isqrt_fused_ns', 'mpncov_kmatrix'):.3f}")
        elif args.command == "loader":
            if gpu:
                continue
            folder = args.folder or os.path.join(os.path.expanduser("~"), ".cache", "finegrained", "bench_jpegs")
            rows = bench_loader(folder, args.images, args.repeats)
        else:
            rows = []
            for backbone in [b.strip() for b in args.backbone.split(",") if b.strip()]:
                rows += bench_step(device, backbone, [h.strip() for h in args.head.split(",") if h.strip()],
                                   args.size, args.batch, args.repeats, autocast=gpu)
        print(f"\n## bench {args.command} on {device} ({torch.get_num_threads()} CPU threads)\n")
        print(format_rows(rows))
        print(f"wrote {write_csv(rows, args.command, device, args.out)}")
    return 0


def _bench_serve(args) -> int:
    """``finegrained bench serve``: prints and records one row per batching setting; exit status 1 if a request
    got an unexpected answer or the server was not healthy after the load."""
    from finegrained.bench.serve import bench_serve
    from finegrained.bench.timing import format_rows, write_csv

    rows = bench_serve(args.model, args.images, requests=args.requests, clients=args.clients,
                       max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout,
                       malformed=args.malformed, workers=args.workers, device=args.serve_device,
                       requests_csv=args.requests_csv)
    print(f"## bench serve: {args.requests} requests ({args.malformed:.0%} malformed) from {args.clients} clients\n")
    print(format_rows(rows))
    on_gpu = args.serve_device == "cuda" or (args.serve_device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if on_gpu else "cpu")
    print(f"wrote {write_csv(rows, 'serve', device, args.out)}")
    bad = [r for r in rows if r["unexpected"] or not r["healthy_after"]]
    for row in bad:
        print(f"error: batching {row['batching']}: {row['unexpected']} unexpected answers, healthy after the load: "
              f"{row['healthy_after']}", file=sys.stderr)
    return 1 if bad else 0
