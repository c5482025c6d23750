"""``launch status``: each job's state from what it wrote and what SLURM says, and the numbers it prints."""
import os
import subprocess
import sys

import torch

from finegrained.launch.campaign import Campaign, JobSpec
from finegrained.launch.status import campaign_status, live_jobs, status_summary
from finegrained.results.runs import append_run


def _campaign(tmp_path, names):
    campaign = Campaign(str(tmp_path))
    campaign.create_or_extend([JobSpec(n, f"{n}.yaml", i) for i, n in enumerate(names)], {})
    campaign.add_submission("slurm", {n: f"12_{i}" for i, n in enumerate(names)})
    return campaign


def test_each_state_and_the_error_shown(tmp_path):
    names = ["done-s0", "failed-s1", "queued-s2", "lost-s3", "stopped-s4", "waiting-s5"]
    campaign = _campaign(tmp_path, names)
    append_run(campaign.record_path("done-s0"), {"top1": 0.87654, "classifier": "softmax", "job_id": "12_0"})
    append_run(campaign.record_path("done-s0"), {"top1": 0.5, "classifier": "svm", "job_id": "12_0"})
    campaign.write_state("done-s0", state="done", requeues=2)
    campaign.write_state("failed-s1", state="failed", error="/data/cub: not found; expected CUB_200_2011/")
    campaign.write_state("queued-s2", state="requeued", requeues=1)
    campaign.write_state("lost-s3", state="running")
    log = os.path.join(campaign.logs, "12_3")
    os.makedirs(log)
    with open(os.path.join(log, "12_3_0_log.err"), "w") as f:
        f.write("loading\nerror: CUDA out of memory\nslurmstepd: error: Detected 1 oom_kill event\n")
    campaign.write_state("stopped-s4", state="stopped", error="finegrained fit stopped by SIGTERM")
    live = {"12_2": "PENDING", "99": "RUNNING"}

    table = campaign_status(str(tmp_path), live=live).set_index("job")
    assert table["state"].to_dict() == {"done-s0": "done", "failed-s1": "failed", "queued-s2": "pending",
                                        "lost-s3": "lost", "stopped-s4": "stopped", "waiting-s5": "not started"}
    assert table.loc["done-s0", "top1"] == "0.8765"  # the softmax record, not the SVM one
    assert table.loc["done-s0", "requeues"] == 2 and table.loc["queued-s2", "requeues"] == 1
    assert table.loc["failed-s1", "error"] == "/data/cub: not found; expected CUB_200_2011/"
    assert table.loc["lost-s3", "error"] == "error: CUDA out of memory"  # the last error: line of its log
    assert table["job_id"].tolist() == [f"12_{i}" for i in range(6)]
    assert table["seed"].tolist() == list(range(6))
    assert status_summary(table) == ("6 job(s): " + ", ".join(f"1 {s}" for s in table["state"].value_counts().index))


def test_a_local_job_runs_while_its_process_lives(tmp_path):
    """A job of the local executor is running while its submitit process lives, and lost once it is gone without
    a word (the launch killed with -9, then the job): a launch again submits the lost one, not the running one."""
    campaign = Campaign(str(tmp_path))
    campaign.create_or_extend([JobSpec("alive-s0", "a.yaml", 0), JobSpec("gone-s1", "a.yaml", 1)], {})
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "submitit"])
    gone = subprocess.Popen([sys.executable, "-c", "pass", "submitit"])
    gone.wait()
    try:
        campaign.add_submission("local", {"alive-s0": f"local-{process.pid}", "gone-s1": f"local-{gone.pid}"})
        campaign.write_state("alive-s0", state="running")
        campaign.write_state("gone-s1", state="requeued")
        assert live_jobs(campaign.job_ids()) == {f"local-{process.pid}": "RUNNING"}
        table = campaign_status(str(tmp_path)).set_index("job")
        assert table["state"].to_dict() == {"alive-s0": "running", "gone-s1": "lost"}
    finally:
        process.kill()
        process.wait()


def test_epoch_is_read_from_the_jobs_last_checkpoint(tmp_path):
    campaign = _campaign(tmp_path, ["a-s0", "b-s1"])
    os.makedirs(campaign.checkpoints("a-s0"))
    torch.save({"epoch": 2, "loops": {"fit_loop": {"epoch_progress": {"current": {"processed": 3}}}},
                "callbacks": {"RunArtifacts": {"max_epochs": 90}}},
               os.path.join(campaign.checkpoints("a-s0"), "last.ckpt"))
    os.makedirs(campaign.checkpoints("b-s1"))
    with open(os.path.join(campaign.checkpoints("b-s1"), "last.ckpt"), "wb") as f:
        f.write(os.urandom(100))
    table = campaign_status(str(tmp_path), live={}).set_index("job")
    assert table.loc["a-s0", "epoch"] == "3/90" and table.loc["b-s1", "epoch"] == "?"
