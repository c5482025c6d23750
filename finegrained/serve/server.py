"""The ``LitServer`` of ``finegrained serve``: its checks before a request reaches a worker, and start-up.

LitServe parses a request in its API process (``request.json()`` or ``request.form()``) and passes it to a worker;
a body that is neither would end as an "Internal server error". :class:`RequestChecks` (an ASGI middleware in front
of ``/predict``) answers such requests itself, with a 4xx and ``{"error": <one line>}``: an unsupported content type
(415), a body larger than the server accepts (413, from Content-Length before reading, else while reading), a JSON
body that does not parse or a multipart body that does not parse (400). What passes is replayed to LitServe
unchanged. Uploaded files stay in memory up to that size, so LitServe can hand the parsed form to its workers.
"""
from __future__ import annotations

import functools
import json
import os
import signal
import socket
import sys
from typing import Any, Dict

import torch

from finegrained.serve.model import ServedModel
from finegrained.serve.requests import EXPECTED

PREDICT_PATH = "/predict"


class RequestChecks:
    """ASGI middleware: refuse, with one line, the bodies LitServe could not parse (see the module docstring)."""

    def __init__(self, app, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != PREDICT_PATH or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        from starlette.formparsers import MultiPartParser
        from starlette.requests import Request

        # Files up to the body limit stay in memory: a spooled file on disk could not be handed to a worker.
        MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size, self.max_body_bytes)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        kind = headers.get("content-type", "").split(";")[0].strip().lower()
        if kind not in ("application/json", "multipart/form-data"):
            return await _refuse(send, 415, f"content type {kind or 'missing'}; {EXPECTED}")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return await _refuse(send, 413, f"body of {declared} bytes; the server accepts at most "
                                            f"{self.max_body_bytes} bytes")
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_body_bytes:
                return await _refuse(send, 413, f"body of more than {self.max_body_bytes} bytes; the server "
                                                f"accepts at most {self.max_body_bytes} bytes")
        body = b"".join(chunks)

        def replay():
            sent = False

            async def again():
                nonlocal sent
                if sent:
                    return await receive()
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return again

        if kind == "application/json":
            try:
                if not isinstance(json.loads(body), dict):
                    raise ValueError("not an object")
            except (ValueError, RecursionError):  # RecursionError: JSON nested deeper than Python recurses
                return await _refuse(send, 400, f"the body is not a JSON object; {EXPECTED}")
        else:
            try:
                await Request(scope, replay()).form()
            except Exception as err:  # starlette's MultiPartException and the parser's own errors
                return await _refuse(send, 400, f"the multipart body does not parse ({err}); {EXPECTED}")
        return await self.app(scope, replay(), send)


async def _refuse(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as err:
            raise OSError(f"{host}:{port}: cannot listen there ({err.strerror}); expected a free port (--port)") \
                from None


def serve(source: str, host: str = "127.0.0.1", port: int = 8000, max_batch_size: int = 16,
          batch_timeout: float = 0.01, workers: int = 1, device: str = "auto", topk: int = 5,
          max_image_bytes: int = 20 << 20, max_pixels: int = 50_000_000, timeout: float = 30.0) -> Dict[str, Any]:
    """Check everything a user can get wrong, then serve ``source`` until interrupted (blocks)."""
    import litserve as ls

    from finegrained.serve.api import ClassifierAPI

    if max_batch_size < 1 or workers < 1 or topk < 1 or batch_timeout < 0 or max_image_bytes < 1 or max_pixels < 1:
        raise ValueError(f"--max_batch_size, --workers, --topk, --max_image_mb and --max_pixels must be positive and "
                         f"--batch_timeout at least 0, got {max_batch_size}, {workers}, {topk}, "
                         f"{max_image_bytes / (1 << 20):g}, {max_pixels} and {batch_timeout}")
    if not 1024 <= port <= 65535:  # LitServe's own range
        raise ValueError(f"--port {port}; expected a port from 1024 to 65535")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device here; expected --device cpu or auto")
    metadata = ServedModel(source, "cpu").metadata  # a broken model is one line here, not a traceback in a worker
    device = "cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device
    check_port(host, port)
    accelerator = device if metadata["format"] == "hf" else "cpu"
    api = ClassifierAPI(source, topk=topk, max_batch_size=max_batch_size, batch_timeout=batch_timeout,
                        max_image_bytes=max_image_bytes, max_pixels=max_pixels)
    server = ls.LitServer(api, accelerator=accelerator, devices=1, workers_per_device=workers, timeout=timeout,
                          model_metadata=metadata,
                          middlewares=[(RequestChecks, {"max_body_bytes": max_image_bytes * 4 // 3 + (64 << 10)})])
    print(f"serving {source} ({metadata['format']}, {len(metadata['classes'])} classes) at "
          f"http://{host}:{port}{PREDICT_PATH}; health /health, metadata /info; batches of up to {max_batch_size} "
          f"within {batch_timeout} s, {workers} worker(s)", file=sys.stderr, flush=True)
    # SIGTERM (a process manager's stop) takes the path of Ctrl-C: LitServe's graceful shutdown, which stops its API
    # servers and workers; the default action would end this process alone and orphan them, still bound to the port.
    previous = signal.signal(signal.SIGTERM, functools.partial(_interrupt, os.getpid()))
    try:
        server.run(host=host, port=port, generate_client_file=False)
    except KeyboardInterrupt:  # an interrupt before LitServe's own handler is in place
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    print("finegrained serve: stopped", file=sys.stderr, flush=True)
    return metadata


def _interrupt(main_pid: int, signum, frame):
    if os.getpid() != main_pid:  # an API server forked by LitServe inherits this: there SIGTERM keeps its default
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise KeyboardInterrupt
