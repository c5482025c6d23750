"""finegrained bench serve: a bounded load test, batching off and on, with bad requests mixed in; every number it
prints and records recomputed from the requests it made."""
import os

import numpy as np
import pandas as pd
import pytest

import finegrained
from finegrained.cli import main
from finegrained.serve.load import request_plan


def test_the_load_test_completes_and_its_numbers_are_the_requests(hf_folder, trained_run, tmp_path, capsys):
    out, requests_csv = str(tmp_path / "bench"), str(tmp_path / "requests.csv")
    capsys.readouterr()
    assert main(["bench", "serve", "--model", hf_folder[0], "--images", os.path.join(trained_run[2], "test"),
                 "--requests", "24", "--clients", "4", "--max_batch_size", "4", "--malformed", "0.25",
                 "--requests_csv", requests_csv, "--out", out]) == 0
    printed = capsys.readouterr().out
    summary = pd.read_csv(os.path.join(out, "serve_cpu.csv"))
    requests = pd.read_csv(requests_csv)
    assert summary["batching"].tolist() == ["off", "on"] and summary["max_batch_size"].tolist() == [1, 4]
    assert set(summary["finegrained"].astype(str)) == {finegrained.__version__}
    for _, row in summary.iterrows():
        mine = requests[requests["max_batch_size"] == row["max_batch_size"]]
        assert len(mine) == row["requests"] == 24 and mine["request"].tolist() == list(range(24))
        images = mine[mine["kind"] == "image"]
        bad = mine[mine["kind"] != "image"]
        assert len(bad) == 6 and set(bad["kind"]) == {"not an image", "wrong field", "JSON without image"}
        assert (images["status"] == 200).all() and bad["status"].between(400, 499).all()  # nothing unexpected
        assert row["answered"] == len(images) and row["refused_4xx"] == len(bad) and row["unexpected"] == 0
        latencies = images["latency_s"].to_numpy() * 1000
        assert row["p50_ms"] == pytest.approx(np.percentile(latencies, 50))
        assert row["p95_ms"] == pytest.approx(np.percentile(latencies, 95))
        assert row["throughput_per_s"] == pytest.approx(len(images) / row["wall_s"])
        assert row["wall_s"] >= latencies.max() / 1000  # the whole run outlasts its slowest request
        assert bool(row["healthy_after"])
        printed_row = next(line for line in printed.splitlines() if f"| {row['batching']} " in line)
        assert f"{row['p50_ms']:.3g}" in printed_row and f"{row['p95_ms']:.3g}" in printed_row


def test_the_request_plan_mixes_in_the_bad_requests_it_says():
    plan = request_plan([("a.jpg", b"\xff\xd8"), ("b.jpg", b"\xff\xd8")], 20, 0.1)
    kinds = [kind for kind, _, _ in plan]
    assert kinds.count("image") == 18 and kinds[9] == "not an image" and kinds[19] == "wrong field"
    assert all(b"filename=\"a.jpg\"" in body for kind, body, _ in plan[0:9:2])
    assert [kind for kind, _, _ in request_plan([("a.jpg", b"x")], 5, 0.0)] == ["image"] * 5
