"""``finegrained launch`` on a real SLURM cluster (slurmctld + slurmd + munged, started by the session fixture).

Every campaign of this module is submitted at once and runs side by side on the one node: a job array of two CUB
recipes (official layout) plus a job with a wrong data root, a job requeued by ``scontrol requeue`` in the middle of
its fit and its uninterrupted twin, and a job of two SLURM tasks that trains with DDP through Lightning's
SLURMEnvironment, compared with ``--trainer.devices 2`` without SLURM.
"""
import json
import os
import re
import subprocess
import time

import pytest
import torch

from finegrained.cli import main
from finegrained.launch.campaign import Campaign, read_campaign_runs
from finegrained.launch.status import campaign_status
from finegrained.results.runs import read_runs
from tests.conftest import REPO_ROOT, make_image_folder, printed_by, run_finegrained, tiny_recipe_text
from tests.replicas import write_cub
from tests.results.test_tables import cells

CUB_RECIPES = [os.path.join(REPO_ROOT, "recipes", "cub", name)
               for name in ("isqrt_resnet50.yaml", "isice_resnet50.yaml")]
SMALL = ["--trainer.max_epochs", "1", "--model.backbone_weights", "null", "--data.init_args.batch_size", "2",
         "--data.init_args.resize_size", "[36, 36]", "--data.init_args.crop_size", "32",
         "--data.init_args.num_workers", "0", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"]
ONE_CPU = ["--executor", "slurm", "--gpus_per_node", "0", "--cpus_per_task", "1"]
TWO_EPOCHS = ["--trainer.max_epochs", "2"]
ENDED = ("done", "failed", "stopped", "lost")


def _wait(predicate, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def _ended(folder):
    return lambda: set(campaign_status(folder)["state"]) <= set(ENDED)


@pytest.fixture(scope="module")
def campaigns(slurm_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("campaigns")
    cub = write_cub(str(tmp / "cub"), n_classes=3, per_class=4)
    tiny = tmp / "tiny.yaml"
    tiny.write_text(tiny_recipe_text(str(tmp / "unused"), make_image_folder(tmp / "data"), backbone="mobilenet_v2"))
    broken = tmp / "wrong_root.yaml"
    broken.write_text(f"base: [{CUB_RECIPES[0]}]\ndata: {{init_args: {{root: {tmp / 'no_such_folder'}}}}}\n")
    out = {name: str(tmp / name) for name in ("table", "requeued", "uninterrupted", "ddp")}
    marker = str(tmp / "paused")
    pause = [{"class_path": "tests.ddp_helpers.PauseOnFirstStart", "init_args": {"marker": marker}}]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO_ROOT)  # the jobs start here and import tests.ddp_helpers
        patch.setenv("PYTHONPATH", REPO_ROOT)
        assert main(["launch"] + CUB_RECIPES + ["--out", out["table"], "--max_parallel", "2",
                                                "--data.init_args.root", cub] + ONE_CPU + SMALL) == 0
        assert main(["launch", str(broken), "--out", out["table"]] + ONE_CPU + SMALL) == 0
        assert main(["launch", str(tiny), "--out", out["uninterrupted"]] + ONE_CPU + TWO_EPOCHS) == 0
        assert main(["launch", str(tiny), "--out", out["requeued"], "--trainer.callbacks", json.dumps(pause)]
                    + ONE_CPU + TWO_EPOCHS) == 0
        assert main(["launch", str(tiny), "--out", out["ddp"], "--tasks_per_node", "2"] + ONE_CPU + TWO_EPOCHS) == 0
        # Requeue the paused job as an administrator or a preemption would: SLURM kills it and queues it again.
        _wait(lambda: os.path.isfile(marker), 240, "the job to reach its second epoch")
        job_id = Campaign(out["requeued"]).job_ids()[Campaign(out["requeued"]).jobs()[0].name]
        slurm = {**os.environ, **slurm_cluster.env}
        subprocess.run(["scontrol", "requeue", job_id], check=True, env=slurm, capture_output=True)
        _wait(lambda: "PENDING" in subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], env=slurm,
                                                  capture_output=True, text=True).stdout, 60, "the requeued job")
        slurm_cluster.release(job_id)
        # The same DDP fit and test without SLURM, while the cluster works.
        reference = tmp / "ddp_reference"
        where = ["--trainer.default_root_dir", str(reference), "--checkpoint.dirpath", str(reference / "checkpoints"),
                 "--runs_csv", str(reference / "runs.csv"), "--trainer.devices", "2", "--trainer.strategy", "ddp",
                 "--trainer.accelerator", "cpu"] + TWO_EPOCHS
        run_finegrained(["fit", "--config", str(tiny)] + where)
        run_finegrained(["test", "--config", str(tiny), "--ckpt_path", str(reference / "checkpoints" / "best.ckpt")]
                        + where)
        for folder in out.values():
            _wait(_ended(folder), 300, f"the jobs of {folder}")
    out["ddp_reference"] = str(reference)
    out["cub"] = cub
    return out


def _ours(cell):
    """Our number in a table cell ``paper / **ours**‡1 (difference)``."""
    return float(re.search(r" / \**([0-9.]+)", cell).group(1))


def _only_record(folder):
    runs = read_campaign_runs(folder)
    assert len(runs) == 1, runs
    return runs.iloc[0]


def _final_weights(folder):
    campaign = Campaign(folder)
    path = os.path.join(campaign.checkpoints(campaign.jobs()[0].name), "last.ckpt")
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_two_recipes_run_as_one_job_array_and_fill_their_table_cells(campaigns, capsys, tmp_path):
    folder = campaigns["table"]
    status = campaign_status(folder).set_index("job")
    done = status[status["state"] == "done"]
    assert len(done) == 2, status
    array_ids = {job_id.split("_")[0] for job_id in done["job_id"]}
    assert len(array_ids) == 1 and all("_" in job_id for job_id in done["job_id"])  # one array, two tasks
    runs = read_campaign_runs(folder)
    assert sorted(runs["job_id"]) == sorted(done["job_id"])  # each record names the job that wrote it
    assert sorted(runs["method"]) == ["isice", "isqrt"] and set(runs["dataset"]) == {"cub"}
    for name, row in done.iterrows():
        record = read_runs(Campaign(folder).record_path(name)).iloc[0]
        assert row["top1"] == f"{record['top1']:.4f}" and row["epoch"] == "1/1"
        assert record["selection"] == "last epoch" and record["validation"] == "test set"  # the honest rule
        assert row["requeues"] == 0

    printed = printed_by(["launch", "status", folder], capsys)
    assert "3 job(s): 2 done, 1 failed" in printed
    assert printed_by(["launch", "collect", folder], capsys)
    tables = os.path.join(folder, "tables")
    isqrt = runs[runs["method"] == "isqrt"].iloc[0]
    birds = cells(os.path.join(tables, "finegrained.md"))[("MPN-COV (iSQRT-COV)", "ResNet-50", "32K")]["Birds"]
    assert _ours(birds) == round(100 * isqrt["top1"], 1)
    isice = runs[runs["method"] == "isice"].iloc[0]
    row = next(values for key, values in cells(os.path.join(tables, "isice_fgvc.md")).items()
               if key[0] == "iSICE" and key[1] == "ResNet-50")
    assert _ours(row["Birds"]) == round(100 * isice["top1"], 1)
    # finegrained tables --campaign is the same command
    assert printed_by(["tables", "--campaign", folder, "--out", str(tmp_path / "t")], capsys)
    assert (tmp_path / "t" / "finegrained.md").read_text() == open(os.path.join(tables, "finegrained.md")).read()


def test_a_failing_job_shows_its_one_line_error_and_the_others_finish(campaigns):
    status = campaign_status(campaigns["table"]).set_index("job")
    failed = status[status["state"] == "failed"]
    assert len(failed) == 1 and failed.index[0].endswith("wrong_root-s0"), status
    error = failed["error"].iloc[0]
    assert "no_such_folder" in error and "\n" not in error and "Traceback" not in error
    assert (status["state"] == "done").sum() == 2


def test_a_job_requeued_mid_fit_resumes_and_ends_as_the_uninterrupted_one(campaigns):
    requeued = campaign_status(campaigns["requeued"]).iloc[0]
    assert requeued["state"] == "done" and requeued["requeues"] == 1, requeued
    log = open(os.path.join(Campaign(campaigns["requeued"]).logs, requeued["job_id"],
                            f"{requeued['job_id']}_0_log.out")).read()
    assert "resuming from" in log  # the second start resumed the fit from last.ckpt
    ours, twin = _only_record(campaigns["requeued"]), _only_record(campaigns["uninterrupted"])
    for metric in ("top1", "mean_class_acc", "epochs"):
        assert ours[metric] == twin[metric]
    # the same row of the tables: the requeued job changed nothing from its recipe but the test's pause callback
    changes = [part for part in ours["overrides"].split("; ") if not part.startswith("trainer.callbacks=")]
    assert "; ".join(changes) == twin["overrides"]
    weights, twin_weights = _final_weights(campaigns["requeued"]), _final_weights(campaigns["uninterrupted"])
    assert weights.keys() == twin_weights.keys()
    for key in weights:
        assert torch.equal(weights[key], twin_weights[key]), key


def test_two_slurm_tasks_train_with_ddp_as_two_devices_do_without_slurm(campaigns):
    status = campaign_status(campaigns["ddp"]).iloc[0]
    assert status["state"] == "done", status
    ours = _only_record(campaigns["ddp"])
    reference = read_runs(os.path.join(campaigns["ddp_reference"], "runs.csv")).iloc[-1]
    for metric in ("top1", "mean_class_acc", "epochs", "selection"):
        assert ours[metric] == reference[metric]
    assert "trainer.devices=" in ours["overrides"] and ours["overrides"] == reference["overrides"]
    log = "".join(open(os.path.join(Campaign(campaigns["ddp"]).logs, status["job_id"], name)).read()
                  for name in sorted(os.listdir(os.path.join(Campaign(campaigns["ddp"]).logs, status["job_id"])))
                  if name.endswith("_log.err"))
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log  # two SLURM tasks joined one process group
    weights = _final_weights(campaigns["ddp"])
    reference_weights = torch.load(os.path.join(campaigns["ddp_reference"], "checkpoints", "last.ckpt"),
                                   map_location="cpu", weights_only=True)["state_dict"]
    assert weights.keys() == reference_weights.keys()
    for key in weights:
        assert torch.equal(weights[key], reference_weights[key]), key
