"""A bounded load test of a running ``finegrained serve``: N requests from C concurrent clients, then it stops.

Each client keeps one HTTP connection (``http.client``, no extra dependency) and sends multipart uploads of the
given images in turn; with ``malformed`` > 0 that share of the requests is bad on purpose (not an image, the wrong
form field, a JSON body without the image), and must be refused with a 4xx while the others are answered.
:func:`summarize` gives what ``finegrained bench serve`` prints and records: the counts, the median and 95th
percentile latency of the answered requests, and their throughput over the wall time of the whole run.
"""
from __future__ import annotations

import http.client
import json
import threading
import time
import uuid
from typing import Dict, List, Sequence, Tuple
from urllib.parse import urlsplit

import numpy as np

PREDICT = "/predict"


def multipart(field: str, filename: str, data: bytes) -> Tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


MALFORMED = (
    ("not an image", lambda: multipart("image", "notes.txt", b"this is not an image")),
    ("wrong field", lambda: multipart("file", "photo.jpg", b"\xff\xd8\xff\xe0")),
    ("JSON without image", lambda: (json.dumps({"picture": "abc"}).encode(), "application/json")),
)


def request_plan(images: Sequence[Tuple[str, bytes]], n: int, malformed: float) -> List[Tuple[str, bytes, str]]:
    """``n`` requests ``(kind, body, content type)``: the images in turn, every ``1/malformed``-th one bad."""
    every = round(1 / malformed) if malformed > 0 else 0
    plan = []
    for k in range(n):
        if every and k % every == every - 1:
            kind, make = MALFORMED[(k // every) % len(MALFORMED)]
            plan.append((kind, *make()))
        else:
            name, data = images[k % len(images)]
            plan.append(("image", *multipart("image", name, data)))
    return plan


def run_load(url: str, plan: List[Tuple[str, bytes, str]], clients: int,
             timeout: float = 120.0) -> Tuple[List[Dict], float]:
    """Send ``plan`` with ``clients`` threads; returns one record per request (``kind``, ``status``, ``latency_s``,
    ``error``) in plan order and the wall time in seconds."""
    parts = urlsplit(url)
    records: List[Dict] = [{} for _ in plan]
    lock, position = threading.Lock(), [0]

    def client():
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        try:
            while True:
                with lock:
                    k = position[0]
                    position[0] += 1
                if k >= len(plan):
                    return
                kind, body, content_type = plan[k]
                start = time.perf_counter()
                try:
                    connection.request("POST", PREDICT, body=body, headers={"Content-Type": content_type})
                    response = connection.getresponse()
                    payload = response.read()
                    status, error = response.status, ""
                    if status >= 400:
                        error = json.loads(payload or b"{}").get("error", payload.decode(errors="replace"))[:200]
                except (OSError, http.client.HTTPException, ValueError) as err:
                    connection.close()
                    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
                    status, error = 0, f"{type(err).__name__}: {err}"[:200]
                records[k] = {"request": k, "kind": kind, "status": status,
                              "latency_s": time.perf_counter() - start, "error": error}
        finally:
            connection.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return records, time.perf_counter() - start


def summarize(records: List[Dict], wall_s: float) -> Dict:
    """Counts, latency percentiles (ms, numpy's linear interpolation) of the images answered with 200, and their
    throughput (per second of the whole run's wall time). ``unexpected``: an image not answered with 200, or a bad
    request not refused with a 4xx (a 5xx, a dropped connection)."""
    answered = [r["latency_s"] for r in records if r["kind"] == "image" and r["status"] == 200]
    refused = [r for r in records if r["kind"] != "image" and 400 <= r["status"] < 500]
    unexpected = len(records) - len(answered) - len(refused)
    latencies = np.array(answered) * 1000
    return {"requests": len(records), "answered": len(answered), "refused_4xx": len(refused),
            "unexpected": unexpected,
            "p50_ms": float(np.percentile(latencies, 50)) if len(latencies) else float("nan"),
            "p95_ms": float(np.percentile(latencies, 95)) if len(latencies) else float("nan"),
            "throughput_per_s": len(answered) / wall_s if wall_s > 0 else float("nan"), "wall_s": wall_s}
