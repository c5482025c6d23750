"""Servers, on loopback, of the session's trained model: its ONNX export and its Hugging Face folder."""
import tempfile

import pytest

from finegrained.bench.serve import free_port, start_server, stop_server


def running(model, max_batch_size=4, batch_timeout=0.01, *extra):
    """A server of ``model`` for the duration of a fixture: yields its url."""
    with tempfile.TemporaryFile() as log:
        process, url = start_server(model, free_port(), max_batch_size, batch_timeout, 1, "cpu", log, *extra)
        try:
            yield url
        finally:
            stop_server(process)
    assert process.poll() is not None


@pytest.fixture(scope="module")
def onnx_server(exported_run):
    yield from running(exported_run["onnx"])


@pytest.fixture(scope="module")
def hf_server(hf_folder):
    # a long batch window so that requests sent together share a batch; small limits to test them cheaply
    yield from running(hf_folder[0], 8, 0.5, "--max_image_mb", "0.05", "--max_pixels", "1000000", "--topk", "3")
