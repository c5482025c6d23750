"""``finegrained serve``: a trained classifier behind an HTTP endpoint (LitServe), see :mod:`finegrained.serve`."""
from __future__ import annotations

import argparse
from typing import List


def serve_command(argv: List[str]) -> int:
    from finegrained.serve.server import serve

    parser = argparse.ArgumentParser(
        prog="finegrained serve", allow_abbrev=False,
        description="Serve a trained classifier: POST an image to /predict (multipart field 'image', or JSON "
                    "{\"image\": base64}) and get the top-k classes and probabilities; GET /health and /info.")
    parser.add_argument("--model", required=True,
                        help="a folder of finegrained export --format hf, or an .onnx / .pt export with its manifest")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max_batch_size", type=int, default=16, help="requests run as one batch (1: no batching)")
    parser.add_argument("--batch_timeout", type=float, default=0.01,
                        help="seconds to wait for a batch to fill")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (each holds the model)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where a Hugging Face folder's network runs (exports run on the CPU)")
    parser.add_argument("--topk", type=int, default=5, help="classes returned per image")
    parser.add_argument("--max_image_mb", type=float, default=20.0, help="largest image file accepted")
    parser.add_argument("--max_pixels", type=int, default=50_000_000,
                        help="most pixels an image may have (larger ones, decompression bombs included, get 413)")
    args = parser.parse_args(argv)
    serve(args.model, host=args.host, port=args.port, max_batch_size=args.max_batch_size,
          batch_timeout=args.batch_timeout, workers=args.workers, device=args.device, topk=args.topk,
          max_image_bytes=int(args.max_image_mb * (1 << 20)), max_pixels=args.max_pixels)
    return 0
