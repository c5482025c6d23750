"""The campaign folder: job names, the campaign file, the jobs' states and records merged on read."""
import os
import re

import pandas as pd
import pytest

from finegrained.launch.campaign import Campaign, JobSpec, job_names, read_campaign_runs
from finegrained.results.runs import RUN_FIELDS, append_run


def test_job_names_are_unique_and_safe_file_names(tmp_path):
    names = job_names(["recipes/cub/isqrt_resnet50.yaml", "recipes/cars/isqrt_resnet50.yaml"], [0, 1])
    assert names == ["cub-isqrt_resnet50-s0", "cub-isqrt_resnet50-s1", "cars-isqrt_resnet50-s0",
                     "cars-isqrt_resnet50-s1"]
    # the same folder and file name under two roots: more of the path tells them apart
    twins = job_names([str(tmp_path / "a" / "cub" / "x.yaml"), str(tmp_path / "b" / "cub" / "x.yaml")], [0])
    assert twins == ["a-cub-x-s0", "b-cub-x-s0"]
    assert job_names([str(tmp_path / "my birds" / "ü & x.yaml")], [3]) == ["my_birds-____x-s3"]
    # the same once made safe, at every depth: a hash of the path tells them apart
    alike = job_names([str(tmp_path / "cub" / "a b.yaml"), str(tmp_path / "cub" / "a_b.yaml")], [0])
    assert len(set(alike)) == 2 and all(re.fullmatch(r".*cub-a_b-[0-9a-f]{6}-s0", name) for name in alike)


def test_a_campaign_refuses_a_folder_of_the_users_and_a_changed_job(tmp_path):
    users = tmp_path / "mine"
    users.mkdir()
    (users / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="holds files and is not a campaign folder"):
        Campaign(str(users)).create_or_extend([JobSpec("a-s0", "a.yaml", 0)], {})
    assert os.listdir(users) == ["notes.txt"] and (users / "notes.txt").read_text() == "keep me"

    campaign = Campaign(str(tmp_path / "c"))
    campaign.create_or_extend([JobSpec("a-s0", "a.yaml", 0, ["--trainer.max_epochs", "1"])], {"executor": "local"})
    campaign.create_or_extend([JobSpec("a-s0", "a.yaml", 0, ["--trainer.max_epochs", "1"]),
                               JobSpec("b-s0", "b.yaml", 0)], {"executor": "local"})
    assert [job.name for job in campaign.jobs()] == ["a-s0", "b-s0"]
    with pytest.raises(ValueError, match="job a-s0 was launched with other settings .setting 2: 1 then, 2 now"):
        campaign.create_or_extend([JobSpec("a-s0", "a.yaml", 0, ["--trainer.max_epochs", "2"])], {})


def test_job_ids_are_each_jobs_latest_submission(tmp_path):
    campaign = Campaign(str(tmp_path))
    campaign.create_or_extend([JobSpec("a-s0", "a.yaml", 0), JobSpec("b-s0", "b.yaml", 0)], {})
    campaign.add_submission("slurm", {"a-s0": "7_0", "b-s0": "7_1"})
    campaign.add_submission("slurm", {"b-s0": "9"})
    assert campaign.job_ids() == {"a-s0": "7_0", "b-s0": "9"}


def test_records_of_many_jobs_are_merged_on_read_without_loss(tmp_path):
    campaign = Campaign(str(tmp_path))
    names = [f"r{i}-s0" for i in range(5)]
    campaign.create_or_extend([JobSpec(n, f"{n}.yaml", 0) for n in names], {})
    for i, name in enumerate(reversed(names)):  # written in the opposite order of their timestamps
        append_run(campaign.record_path(name), {"recipe": name, "top1": i / 10, "job_id": f"3_{i}",
                                                "timestamp": f"2026-01-0{5 - i}T00:00:00+00:00"})
    # a test that was stopped before it finished leaves a partial file: not a record
    with open(campaign.record_path("r0-s0") + ".partial", "w") as f:
        f.write(",".join(RUN_FIELDS) + "\nhalf")
    runs = read_campaign_runs(str(tmp_path))
    assert list(runs.columns) == RUN_FIELDS and len(runs) == 5
    assert runs["recipe"].tolist() == names  # oldest first
    assert sorted(runs["job_id"]) == [f"3_{i}" for i in range(5)]
    assert runs["top1"].tolist() == pytest.approx([0.4, 0.3, 0.2, 0.1, 0.0])


def test_reading_a_folder_that_is_not_a_campaign_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a campaign folder"):
        read_campaign_runs(str(tmp_path))
    (tmp_path / "campaign.json").write_bytes(os.urandom(64))
    with pytest.raises(ValueError, match="campaign.json: not readable as JSON"):
        Campaign(str(tmp_path)).read()


def test_state_updates_keep_what_they_do_not_change(tmp_path):
    campaign = Campaign(str(tmp_path))
    campaign.write_state("a-s0", state="running", job_id="4", starts=1)
    campaign.write_state("a-s0", fit_done=True)
    state = campaign.state("a-s0")
    assert state["state"] == "running" and state["job_id"] == "4" and state["fit_done"] is True
    assert [p for p in os.listdir(campaign.run_folder("a-s0")) if "tmp" in p] == []  # written by rename
    assert pd.Timestamp(state["updated"])


@pytest.mark.parametrize("content, expected", [
    ("a,b\n1,2\n", "lacks the columns"),
    (",".join(RUN_FIELDS) + "\n" + ",".join("abc" if f == "top1" else "" for f in RUN_FIELDS) + "\n",
     "row 2: top1 is 'abc'; expected a fraction between 0 and 1"),
    (",".join(RUN_FIELDS) + "\n" + ",".join("87.5" if f == "top1" else "" for f in RUN_FIELDS) + "\n",
     "top1 is '87.5'; expected a fraction"),
])
def test_a_record_file_with_garbage_is_named_with_what_was_expected(tmp_path, content, expected):
    campaign = Campaign(str(tmp_path))
    campaign.create_or_extend([JobSpec("a-s0", "a.yaml", 0)], {})
    os.makedirs(os.path.dirname(campaign.record_path("a-s0")))
    with open(campaign.record_path("a-s0"), "w") as f:
        f.write(content)
    with pytest.raises(ValueError, match=re.escape(expected)) as error:
        read_campaign_runs(str(tmp_path))
    assert str(error.value).startswith(campaign.record_path("a-s0"))
