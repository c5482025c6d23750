"""finegrained serve on loopback: its answers are predict-images' and the tested model's; bad requests get a 4xx
with one line, alone, while the server keeps serving; /health and /info; refusals before it starts."""
import base64
import io
import json
import os
import struct
import threading
import urllib.request
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from finegrained.cli import entry_point
from finegrained.serve.load import multipart
from tests.conftest import REPO_ROOT  # noqa: F401 (the repository's conftest: fixtures trained_run, exported_run)


def _post(url, body, content_type):
    request = urllib.request.Request(url + "/predict", data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _images(data_root):
    folder = os.path.join(data_root, "test")
    return sorted(os.path.join(folder, c, f) for c in sorted(os.listdir(folder))
                  for f in os.listdir(os.path.join(folder, c)))


def _png_header(width, height):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))


def test_the_answers_are_predict_images_answers(onnx_server, exported_run, trained_run):
    from finegrained.predict import predict_images

    images = _images(trained_run[2])
    rows, failures = predict_images(exported_run["onnx"], images, topk=3, out=io.StringIO())
    assert not failures
    expected = {}
    for row in rows:
        expected.setdefault(row["path"], []).append((row["class"], row["index"], row["probability"]))
    for k, path in enumerate(images):
        data = open(path, "rb").read()
        if k % 2:  # both request forms; base64 with line breaks (base64 without -w0) or as a data: URI
            encoded = base64.encodebytes(data).decode() if k % 4 == 1 else \
                "data:image/png;base64," + base64.b64encode(data).decode()
            status, answer = _post(onnx_server, json.dumps({"image": encoded}).encode(), "application/json")
        else:
            status, answer = _post(onnx_server, *multipart("image", os.path.basename(path), data))
        assert status == 200
        got = [(p["class"], p["index"], p["probability"]) for p in answer["predictions"]]
        assert [g[:2] for g in got] == [e[:2] for e in expected[path]]
        assert np.allclose([g[2] for g in got], [e[2] for e in expected[path]], atol=1e-6)


def test_a_hub_folder_answers_with_the_tested_models_probabilities(hf_server, hf_folder, trained_run):
    from finegrained.model import load_classifier
    from finegrained.predict import preprocess_image

    classifier = load_classifier(trained_run[1]).eval()
    spec = classifier.hparams.preprocessing
    images = _images(trained_run[2])[:6]
    with torch.no_grad():
        expected = classifier.predict_logits(torch.stack([preprocess_image(p, spec) for p in images])).softmax(1)
    for path, probabilities in zip(images, expected):
        status, answer = _post(hf_server, *multipart("image", "x.png", open(path, "rb").read()))
        assert status == 200 and len(answer["predictions"]) == 3
        for p in answer["predictions"]:
            assert p["class"] == classifier.hparams.class_names[p["index"]]
            assert p["probability"] == pytest.approx(float(probabilities[p["index"]]), abs=1e-6)
        assert [p["probability"] for p in answer["predictions"]] == sorted(
            (p["probability"] for p in answer["predictions"]), reverse=True)


def _bad_requests(tmp_path):
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    truncated = jpeg.getvalue()[: len(jpeg.getvalue()) // 2]
    expected = 'expected a multipart form with the image file in the field "image"'
    return [
        ("not an image", *multipart("image", "a.txt", b"hello"), 400, "not an image PIL can read"),
        ("empty file", *multipart("image", "a.jpg", b""), 400, "the image is empty"),
        ("truncated JPEG", *multipart("image", "a.jpg", truncated), 400, "the image: corrupt or truncated image"),
        ("bomb", *multipart("image", "b.png", _png_header(100_000, 100_000)), 413, "pixels"),
        ("over max_pixels", *multipart("image", "b.png", _png_header(2000, 1000)), 413,
         "image of 2000×1000 = 2000000 pixels; the server accepts at most 1000000 pixels"),
        ("thin image", *multipart("image", "t.png", _png_header(1, 100_000)), 413,
         "image of 1×100000 pixels would have 518400000 once resized (resize 72)"),
        ("deeply nested JSON", b'{"image": ' + b"[" * 5_000 + b"]" * 5_000 + b"}", "application/json", 400,
         "the body is not a JSON object"),
        ("too large", *multipart("image", "c.jpg", b"\xff" * 60_000), 413, "the server accepts at most 52428 bytes"),
        ("huge body", *multipart("image", "c.jpg", b"\xff" * 200_000), 413, "the server accepts at most"),
        ("wrong field", *multipart("file", "a.jpg", jpeg.getvalue()), 400, "no single file in the form field 'image'"),
        ("JSON without image", json.dumps({"img": "x"}).encode(), "application/json", 400, "no 'image' in the JSON"),
        ("JSON not base64", json.dumps({"image": "%%%"}).encode(), "application/json", 400, "is not base64"),
        ("JSON list", b"[1, 2]", "application/json", 400, "the body is not a JSON object"),
        ("not JSON", b"{oops", "application/json", 400, "the body is not a JSON object"),
        ("raw bytes", jpeg.getvalue(), "image/jpeg", 415, "content type image/jpeg; " + expected),
        ("broken multipart", b"--x\r\nnothing", "multipart/form-data; boundary=x", 400, ""),
    ]


def test_bad_requests_get_one_line_4xx_and_the_server_keeps_serving(hf_server, trained_run, tmp_path):
    good = open(_images(trained_run[2])[0], "rb").read()
    for name, body, content_type, status, message in _bad_requests(tmp_path):
        got, answer = _post(hf_server, body, content_type)
        assert got == status, (name, answer)
        assert set(answer) == {"error"} and "\n" not in answer["error"] and message in answer["error"], (name, answer)
        assert _post(hf_server, *multipart("image", "ok.jpg", good))[0] == 200, name
    with urllib.request.urlopen(hf_server + "/health") as response:
        assert response.read() == b"ok"


def test_a_bad_request_batched_with_good_ones_fails_alone(hf_server, trained_run):
    """The batch window (0.5 s) gathers these 6 requests into one batch; only the bad one is refused."""
    images = _images(trained_run[2])[:5]
    bodies = [multipart("image", "a.jpg", open(p, "rb").read()) for p in images]
    bodies.insert(2, multipart("image", "a.txt", b"not an image"))
    answers = [None] * len(bodies)

    def send(k):
        answers[k] = _post(hf_server, *bodies[k])
    threads = [threading.Thread(target=send, args=(k,)) for k in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [a[0] for a in answers] == [200, 200, 400, 200, 200, 200]


def test_info_and_health(hf_server, hf_folder):
    from finegrained.results.runs import read_runs

    with urllib.request.urlopen(hf_server + "/info") as response:
        info = json.loads(response.read())["model"]
    config = json.load(open(os.path.join(hf_folder[0], "config.json")))
    assert info["format"] == "hf" and info["classes"] == config["class_names"]
    assert info["preprocessing"] == config["preprocessing"]
    record = read_runs(hf_folder[1]).iloc[-1]
    assert info["card"]["evaluation"]["top1"] == pytest.approx(record["top1"])
    assert info["card"]["head"] == "isqrt" and info["card"]["test_flip"] is True


def test_serve_refuses_what_it_cannot_serve_before_starting(hf_folder, tmp_path, capsys):
    import shutil
    import socket

    (tmp_path / "model.ckpt").write_bytes(os.urandom(100))  # a checkpoint, not an export
    assert entry_point(["serve", "--model", str(tmp_path / "model.ckpt")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'model.ckpt'}.json: not found; expected the "
                                              f"manifest finegrained export writes beside model.ckpt")
    assert entry_point(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'missing'}: not found; expected a folder")
    broken = tmp_path / "broken"
    shutil.copytree(hf_folder[0], broken)
    (broken / "model.safetensors").write_bytes(os.urandom(1000))
    assert entry_point(["serve", "--model", str(broken)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {broken / 'model.safetensors'}: not a safetensors file") and err.count("\n") == 1
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert entry_point(["serve", "--model", hf_folder[0], "--port", str(port)]) == 2
    assert f"127.0.0.1:{port}: cannot listen there" in capsys.readouterr().err
    for option, value, message in [("--max_batch_size", "0", "must be positive"),
                                   ("--max_image_mb", "0", "must be positive"),
                                   ("--port", "70000", "expected a port from 1024 to 65535"),
                                   ("--port", "80", "expected a port from 1024 to 65535")]:
        assert entry_point(["serve", "--model", hf_folder[0], option, value]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, (option, value, err)
    if not torch.cuda.is_available():
        assert entry_point(["serve", "--model", hf_folder[0], "--device", "cuda"]) == 2
        assert capsys.readouterr().err == ("error: --device cuda, but torch sees no CUDA device here; expected "
                                           "--device cpu or auto\n")


def _descendants(pid):
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def test_sigterm_stops_the_server_and_every_process_it_started(hf_folder, tmp_path):
    """As a process manager stops it: SIGTERM to the server's own process only, not to its group."""
    import signal
    import tempfile
    import time

    from finegrained.bench.serve import free_port, start_server

    with tempfile.TemporaryFile() as log:
        process, url = start_server(hf_folder[0], free_port(), 4, 0.01, 2, "cpu", log)
        started = _descendants(process.pid)
        assert len(started) >= 3  # API server and two workers, at least
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        log.seek(0)
        output = log.read().decode(errors="replace")
    deadline = time.monotonic() + 10
    while [p for p in started if os.path.exists(f"/proc/{p}")] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in started if os.path.exists(f"/proc/{p}")], output[-2000:]
    assert "Traceback" not in output and output.rstrip().endswith("finegrained serve: stopped")
