"""``finegrained launch``'s command line: what goes to fit/test, and bad input as one line with exit status 2,
before anything is submitted or written."""
import os

import pytest

from finegrained.cli import entry_point
from finegrained.cli.launch import split_recipe_settings
from tests.conftest import REPO_ROOT, printed_by

RECIPE = os.path.join(REPO_ROOT, "recipes", "cub", "isqrt_resnet50.yaml")


def test_dotted_options_and_their_values_go_to_fit_and_test():
    own, settings = split_recipe_settings(
        ["r.yaml", "--out", "c", "--data.init_args.root", "/d", "--seeds", "0", "1", "--trainer.max_epochs=3",
         "--trainer.callbacks", '[{"class_path": "x"}]', "--model.test_flip", "--executor", "local"])
    assert own == ["r.yaml", "--out", "c", "--seeds", "0", "1", "--executor", "local"]
    assert settings == ["--data.init_args.root", "/d", "--trainer.max_epochs=3", "--trainer.callbacks",
                        '[{"class_path": "x"}]', "--model.test_flip"]


def _one_line_error(args, capsys):
    capsys.readouterr()
    assert entry_point(args) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    users = tmp_path / "my_results"
    users.mkdir()
    (users / "paper.tex").write_text("mine")
    line = _one_line_error(["launch", RECIPE, "--out", str(users), "--executor", "local"], capsys)
    assert "holds files and is not a campaign folder" in line
    assert os.listdir(users) == ["paper.tex"] and (users / "paper.tex").read_text() == "mine"

    out = tmp_path / "new"
    assert "no recipe matches" in _one_line_error(["launch", str(tmp_path / "none" / "*.yaml"), "--out", str(out)],
                                                  capsys)
    line = _one_line_error(["launch", RECIPE, "--out", str(out), "--executor", "local", "--trainer.max_epocs", "1"],
                           capsys)
    assert "max_epocs" in line
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    assert "sbatch: not found" in _one_line_error(["launch", RECIPE, "--out", str(out)], capsys)
    assert not out.exists()  # nothing was started

    assert "not a campaign folder" in _one_line_error(["launch", "status", str(users)], capsys)
    assert "expected CAMPAIGN_DIR" in _one_line_error(["launch", "collect", "--runs", "all"], capsys)
    assert "each seed once" in _one_line_error(["launch", RECIPE, "--out", str(out), "--seeds", "1", "1"], capsys)
    assert "expected seeds from 0 to 4294967295" in _one_line_error(["launch", RECIPE, "--out", str(out), "--seeds",
                                                                     "-1", "--executor", "local"], capsys)
    assert "expected at least 4 minutes" in _one_line_error(["launch", RECIPE, "--out", str(out), "--time", "1"],
                                                            capsys)
    readme = os.path.join(REPO_ROOT, "README.md")
    assert "README.md: not a folder" in _one_line_error(["launch", RECIPE, "--out", readme, "--executor", "local"],
                                                        capsys)
    noise = tmp_path / "noise.yaml"
    noise.write_bytes(os.urandom(300))
    assert f"{noise}: not a recipe; expected a YAML mapping" in _one_line_error(
        ["launch", str(noise), "--out", str(out), "--executor", "local"], capsys)
    assert not out.exists()


def test_a_refused_submission_is_one_line_and_leaves_no_campaign(tmp_path, capsys, monkeypatch):
    sbatch = tmp_path / "bin" / "sbatch"
    sbatch.parent.mkdir()
    sbatch.write_text("#!/bin/sh\necho 'sbatch: error: Batch job submission failed: Invalid partition name' >&2\n"
                      "exit 1\n")
    sbatch.chmod(0o755)
    monkeypatch.setenv("PATH", f"{sbatch.parent}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "campaign"
    line = _one_line_error(["launch", RECIPE, "--out", str(out), "--partition", "nope"], capsys)
    assert line.startswith("error: sbatch refused the job array: sbatch: error: Batch job submission failed: "
                           "Invalid partition name")
    assert not out.exists()
    # Into an earlier campaign: its files stay, and nothing of the refused submission is left in it.
    from finegrained.launch.campaign import Campaign, JobSpec

    earlier = Campaign(str(tmp_path / "earlier"))
    earlier.create_or_extend([JobSpec("other-s0", "other.yaml", 0)], {})
    os.makedirs(os.path.join(earlier.logs, "12_0"))
    before = sorted(os.listdir(earlier.folder)), sorted(os.listdir(earlier.logs))
    _one_line_error(["launch", RECIPE, "--out", earlier.folder, "--partition", "nope"], capsys)
    assert (sorted(os.listdir(earlier.folder)), sorted(os.listdir(earlier.logs))) == before
    assert [job.name for job in earlier.jobs()] == ["other-s0"]


def test_a_campaign_file_of_random_bytes_is_one_line(tmp_path, capsys):
    (tmp_path / "campaign.json").write_bytes(os.urandom(200))
    assert "campaign.json: not readable as JSON" in _one_line_error(["launch", "status", str(tmp_path)], capsys)


@pytest.mark.parametrize("flag, value", [("--max_parallel", "0"), ("--time", "-5"), ("--nodes", "0")])
def test_resources_out_of_range(flag, value, capsys, tmp_path):
    assert "expected a positive number" in _one_line_error(["launch", RECIPE, "--out", str(tmp_path / "c"), flag,
                                                            value, "--executor", "local"], capsys)


def test_estimate_is_epochs_times_training_images_over_measured_images_per_second(tmp_path, capsys):
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "step_cuda.csv").write_text(
        "backbone,head,size,batch,images_per_s,gpu,timestamp\n"
        "resnet50,isqrt,448,32,100.0,Old GPU,2026-01-01T00:00:00+00:00\n"
        "resnet50,isqrt,448,32,500.0,Test GPU,2026-02-01T00:00:00+00:00\n"  # the newest measurement counts
        "resnet50,isqrt,224,32,9999.0,Test GPU,2026-02-01T00:00:00+00:00\n")  # another crop: not this recipe's
    recipes = [RECIPE, os.path.join(REPO_ROOT, "recipes", "aircraft", "isqrt_resnet50.yaml"),
               os.path.join(REPO_ROOT, "recipes", "cub", "gap_resnet50.yaml")]
    printed = printed_by(["launch"] + recipes + ["--estimate", "--bench", str(bench), "--seeds", "0", "1",
                                                 "--trainer.max_epochs", "30"], capsys)
    cub, aircraft = 30 * 5994 / 500 / 3600, 30 * 6667 / 500 / 3600  # by hand: epochs × images ÷ images/s
    lines = {"/".join(line.split()[0].split("/")[-2:]): line.split() for line in printed.splitlines()
             if ".yaml" in line}
    assert lines["cub/isqrt_resnet50.yaml"][-1] == f"{cub:.2f}"
    assert lines["aircraft/isqrt_resnet50.yaml"][-1] == f"{aircraft:.2f}"
    assert lines["cub/gap_resnet50.yaml"][-1] == "—" and "not measured" in printed
    assert f"Total: {2 * (cub + aircraft):.1f} GPU-hours for 2 recipe(s) × 2 seed(s)" in printed
    assert "1 recipe(s) without an estimate" in printed
    assert not os.path.exists(os.path.join(REPO_ROOT, "campaign"))  # nothing submitted, nothing written
