"""``finegrained bench serve``: the load test of :mod:`finegrained.serve.load` against a real ``finegrained serve``,
with dynamic batching off (``--max_batch_size 1``) and on, in the same run.

For each setting a server is started as its own process on a free loopback port, waited for (``/health``), warmed
up (two requests per client, not counted), loaded with the same requests (bad ones mixed in), checked to be still
healthy, and stopped. One row per setting goes to
``results/bench/serve_<device>.csv`` with the machine's description; ``--requests_csv`` also keeps every request
(kind, status, latency), from which the summary can be recomputed.
"""
from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Dict, List, Optional

from datamodules.io import IMAGE_EXTENSIONS
from finegrained.serve.load import request_plan, run_load, summarize
from finegrained.serve.model import describe

SERVER = "import sys; from finegrained.cli import entry_point; sys.exit(entry_point(sys.argv[1:]))"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _images(folder: str, limit: int = 64) -> List[tuple]:
    paths = sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
                   if name.lower().endswith(IMAGE_EXTENSIONS))[:limit]
    if not paths:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}); expected a folder of test images")
    return [(os.path.basename(p), open(p, "rb").read()) for p in paths]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as response:
            return response.status == 200 and response.read().strip() == b"ok"
    except OSError:
        return False


def start_server(model: str, port: int, max_batch_size: int, batch_timeout: float, workers: int, device: str, log,
                 *extra: str):
    """``finegrained serve`` as a process of its own (its output to ``log``), once ``/health`` says ok: (process,
    url). A server that exits or is not healthy within 5 minutes is a RuntimeError with its last line."""
    process = subprocess.Popen([sys.executable, "-c", SERVER, "serve", "--model", model, "--port", str(port),
                                "--max_batch_size", str(max_batch_size), "--batch_timeout", str(batch_timeout),
                                "--workers", str(workers), "--device", device, *extra],
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 300
    while not healthy(url):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_server(process)
            log.seek(0)
            tail = log.read().decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"finegrained serve --model {model} did not become healthy ({tail[0][:300]})")
        time.sleep(0.5)
    return process, url


def stop_server(process) -> None:
    """Interrupt the server's process group (as Ctrl-C), killing it after 30 s."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def bench_serve(model: str, images: str, requests: int = 200, clients: int = 8, max_batch_size: int = 16,
                batch_timeout: float = 0.01, malformed: float = 0.1, workers: int = 1, device: str = "cpu",
                requests_csv: Optional[str] = None) -> List[Dict]:
    """One summary row per setting (batching off, then on); see the module docstring."""
    if requests < 1 or clients < 1 or max_batch_size < 2 or not 0 <= malformed < 1:
        raise ValueError(f"--requests and --clients must be at least 1, --max_batch_size at least 2 and --malformed "
                         f"in [0, 1), got {requests}, {clients}, {max_batch_size} and {malformed}")
    metadata = describe(model)
    plan = request_plan(_images(images), requests, malformed)
    rows, kept = [], []
    for batch in (1, max_batch_size):
        with tempfile.TemporaryFile() as log:
            process, url = start_server(model, free_port(), batch, batch_timeout, workers, device, log)
            try:
                run_load(url, [r for r in plan if r[0] == "image"][:2 * clients], clients)  # warm-up, not counted
                records, wall = run_load(url, plan, clients)
                still_healthy = healthy(url)
            finally:
                stop_server(process)
        rows.append({"model": f"{metadata['card']['backbone']} + {metadata['card']['head']} ({metadata['format']})",
                     "batching": "off" if batch == 1 else "on", "max_batch_size": batch,
                     "batch_timeout_s": batch_timeout if batch > 1 else 0.0, "clients": clients, "workers": workers,
                     **summarize(records, wall), "healthy_after": still_healthy})
        kept += [{"max_batch_size": batch, **r} for r in records]
    if requests_csv:
        with open(requests_csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(kept[0]))
            writer.writeheader()
            writer.writerows(kept)
    return rows
