"""``finegrained launch --executor local``: a campaign of one CUB recipe × two seeds on this machine, through the
CLI, from the official layout to the table cell (the mean over the seeds), then launched again."""
import os
import re

from finegrained.launch.campaign import Campaign, read_campaign_runs
from finegrained.launch.status import campaign_status
from tests.conftest import REPO_ROOT, make_image_folder, printed_by, tiny_recipe_text
from tests.replicas import write_cub
from tests.results.test_tables import cells

RECIPE = os.path.join(REPO_ROOT, "recipes", "cub", "isqrt_resnet50.yaml")
SMALL = ["--trainer.max_epochs", "1", "--model.backbone_weights", "null", "--data.init_args.batch_size", "2",
         "--data.init_args.resize_size", "[36, 36]", "--data.init_args.crop_size", "32",
         "--data.init_args.num_workers", "0", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"]


def test_two_seeds_here_fill_the_cell_with_their_mean(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cub = write_cub(str(tmp_path / "cub"), n_classes=3, per_class=4)
    out = str(tmp_path / "campaign")
    command = ["launch", RECIPE, "--executor", "local", "--seeds", "0", "1", "--max_parallel", "2", "--out", out,
               "--data.init_args.root", cub] + SMALL
    printed = printed_by(command, capsys)
    assert "2 of 2 job(s) done" in printed
    assert re.search(r"done +cub-isqrt_resnet50-s0 \(local-\d+\)", printed) and "cub-isqrt_resnet50-s1" in printed

    status = campaign_status(out).set_index("job")
    assert status["state"].tolist() == ["done", "done"] and status["seed"].tolist() == [0, 1]
    runs = read_campaign_runs(out).set_index("job_id")
    for name, row in status.iterrows():
        record = runs.loc[row["job_id"]]  # the status and the record name the same job
        assert row["top1"] == f"{record['top1']:.4f}" and row["epoch"] == "1/1"
        assert os.path.isfile(os.path.join(Campaign(out).checkpoints(name), "last.ckpt"))

    printed_by(["launch", "collect", out], capsys)
    birds = cells(os.path.join(out, "tables", "finegrained.md"))[("MPN-COV (iSQRT-COV)", "ResNet-50", "32K")]["Birds"]
    mean = 100 * (runs["top1"].iloc[0] + runs["top1"].iloc[1]) / 2
    assert float(re.search(r" / \**([0-9.]+)", birds).group(1)) == round(mean, 1)

    # Launched again: both jobs are done, nothing runs, nothing is overwritten.
    before = {name: os.path.getmtime(Campaign(out).record_path(name)) for name in status.index}
    assert "2 of 2 job(s) already done, queued or running" in printed_by(command, capsys)
    assert {name: os.path.getmtime(Campaign(out).record_path(name)) for name in status.index} == before


def test_a_job_of_two_local_tasks_trains_as_one_ddp_group(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(tiny_recipe_text(str(tmp_path / "unused"), make_image_folder(tmp_path / "data"),
                                       backbone="mobilenet_v2"))
    out = str(tmp_path / "campaign")
    printed = printed_by(["launch", str(recipe), "--executor", "local", "--gpus_per_node", "0", "--tasks_per_node",
                          "2", "--out", out], capsys)
    assert "1 of 1 job(s) done" in printed
    status = campaign_status(out).iloc[0]
    logs = os.path.join(Campaign(out).logs, status["job_id"].removeprefix("local-"))
    errors = "".join(open(os.path.join(logs, name)).read() for name in sorted(os.listdir(logs))
                     if name.endswith("_log.err"))
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in errors  # the second task joined the first, no process of its own
    assert read_campaign_runs(out)["overrides"].iloc[0] == "trainer.devices='2'"
