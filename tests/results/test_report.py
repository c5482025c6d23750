"""`finegrained report`: the page's numbers, images, escaping, Grad-CAM maps, and a real browser rendering it."""
import html
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from finegrained.cli import main
from finegrained.model import FineGrainedClassifier
from tests.conftest import PALETTE, write_image

EVIL = "<img src=x onerror=alert(1)>"
CLASSES = sorted(["a<b & c", EVIL, "plain"])  # ImageFolder's class order


@pytest.fixture(scope="module")
def evil_run(tmp_path_factory):
    """A classifier on a folder whose class names are markup, its recipe, and one export beside it."""
    from finegrained.cli.data import datamodule_from_config
    from finegrained.export import export_classifier

    tmp = tmp_path_factory.mktemp("report")
    for split in ("train", "test"):
        for c, name in enumerate(CLASSES):
            for i in range(4):
                write_image(str(tmp / "data" / split / name / f"{i}.png"), PALETTE[c], size=48, seed=10 * c + i)
    recipe = tmp / "recipe.yaml"
    recipe.write_text(f"""
data:
  class_path: datamodules.ImageFolderDataModule
  init_args:
    root: {tmp / "data"}
    val_fraction: 0.25
    batch_size: 4
    num_workers: 0
    resize_size: 72
    crop_size: 64
""")
    datamodule = datamodule_from_config(str(recipe))
    datamodule.prepare_data()
    datamodule.setup("fit")
    assert datamodule.class_names == CLASSES
    torch.manual_seed(0)
    model = FineGrainedClassifier(3, backbone="resnet18", backbone_weights=None, last_stride=1, head="isqrt",
                                  head_kwargs={"reduction": 8}, class_names=CLASSES,
                                  preprocessing=datamodule.preprocessing)
    (tmp / "run" / "checkpoints").mkdir(parents=True)
    ckpt = str(tmp / "run" / "checkpoints" / "best.ckpt")
    history = [{"epoch": e, "train_loss_epoch": 1.0 / (e + 1), "val_top1": 0.3 + 0.1 * e, "lr-SGD/backbone": 0.01,
                "lr-SGD/classifier": 0.05} for e in range(3)]
    import pytorch_lightning

    torch.save({"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict(), "epoch": 2,
                "pytorch-lightning_version": pytorch_lightning.__version__,
                "callbacks": {"RunArtifacts": {"history": history, "train_wall_s": 1.0}}}, ckpt)
    export_classifier(ckpt, "torchscript", str(tmp / "run" / "model.pt"))
    return str(recipe), ckpt, tmp


@pytest.fixture(scope="module")
def report(evil_run):
    recipe, ckpt, tmp = evil_run
    out = tmp / "report"
    assert main(["report", "--ckpt", ckpt, "--config", recipe, "--out", str(out), "--cam-images", "4"]) == 0
    return out, (out / "index.html").read_text(encoding="utf-8")


def _expected_confusion(evil_run):
    from finegrained.cli.data import datamodule_from_config
    from finegrained.model import load_classifier

    recipe, ckpt, _ = evil_run
    model = load_classifier(ckpt)
    datamodule = datamodule_from_config(recipe)
    datamodule.prepare_data()
    datamodule.setup("test")
    counts = np.zeros((3, 3), dtype=int)
    with torch.no_grad():
        for images, labels in datamodule.test_dataloader():
            for true, predicted in zip(labels.tolist(), model.predict_logits(images).argmax(1).tolist()):
                counts[true, predicted] += 1
    return counts


def test_every_image_of_the_page_exists_and_nothing_is_remote(report):
    out, page = report
    sources = re.findall(r'<img[^>]* src="([^"]+)"', page)
    assert len(sources) >= 3 + 4  # plots, pair examples, Grad-CAM overlays
    for source in sources:
        assert not re.match(r"^[a-z]+://|^//", source), source
        assert os.path.isfile(out / html.unescape(source)), source
    assert not re.search(r'(href|src)="(https?:)?//', page) and "<script" not in page


def test_class_names_are_shown_as_text_and_run_nothing(report):
    _, page = report
    for name in CLASSES:
        assert html.escape(name, quote=False) in page, name
    assert EVIL not in page and "onerror=alert(1)>" not in page.replace("&gt;", "")
    assert "&lt;img src=x onerror=alert(1)&gt;" in page


def test_per_class_numbers_are_the_confusion_matrix(report, evil_run):
    out, page = report
    expected = _expected_confusion(evil_run)
    written = np.loadtxt(out / "confusion_matrix.csv", delimiter=",", skiprows=1, usecols=(1, 2, 3), dtype=int)
    np.testing.assert_array_equal(written, expected)
    rows = re.findall(r'<td class="class-name">(.*?)</td><td class="num">(\d+)</td><td class="num">(\d+)</td>', page)
    assert len(rows) == 3
    for name, images, correct in rows:
        k = CLASSES.index(html.unescape(name))
        assert (int(images), int(correct)) == (expected[k].sum(), expected[k, k])
    top1 = float(re.search(r'id="top1">([0-9.]+)<', page).group(1))
    assert top1 == pytest.approx(np.trace(expected) / expected.sum(), abs=1e-4)


def test_page_shows_curves_exports_and_the_run(report, evil_run):
    out, page = report
    assert os.path.isfile(out / "images" / "training_curves.png")
    assert "model.pt.json" in page and "yes" in page  # the export made from this checkpoint
    assert "resnet18" in page and "isqrt" in page and "best" in page


@pytest.mark.parametrize("backbone", ["resnet18", "timm/vit_small_patch16_224", "timm/swin_tiny_patch4_window7_224"])
def test_grad_cam_maps_have_the_image_size_and_are_not_constant(backbone):
    from finegrained.results.report import grad_cam_maps

    torch.manual_seed(0)
    head = "sot" if backbone.startswith("timm/") else "isqrt"
    model = FineGrainedClassifier(3, backbone=backbone, backbone_weights=None, head=head,
                                  head_kwargs={"reduction": 8} if head == "isqrt" else {"heads": 2, "rank": 4})
    side = 224 if "swin" in backbone else 64  # Swin's windows need 7×7 patches at the last stage
    images = torch.randn(2, 3, side, side)
    maps = grad_cam_maps(model, images, [0, 1], torch.device("cpu"))
    assert maps.shape == (2, side, side)
    assert np.isfinite(maps).all() and all(m.std() > 1e-3 for m in maps)


def test_missing_config_is_one_clear_error(evil_run, tmp_path):
    _, ckpt, _ = evil_run
    with pytest.raises(ValueError, match="--config"):
        main(["report", "--ckpt", ckpt, "--out", str(tmp_path / "r")])


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(not _chromium(), reason="Debian's chromium is not installed (make setup installs it when run as "
                                            "root: apt-get install chromium)")
def test_the_page_renders_in_a_headless_browser(report, tmp_path):
    from PIL import Image

    out, _ = report
    shot = tmp_path / "page.png"
    subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1200,1600", (out / "index.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (1600, 1200)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.01  # text and images, not a blank page


def test_fit_logs_to_tensorboard_and_csv_with_a_learning_rate_per_group(trained_run):
    import glob

    import pandas as pd
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, ckpt, _ = trained_run
    # The fixture's fit is the first run under its root (other tests test the same run into later versions);
    # both loggers write into that one version folder.
    folders = [os.path.join(os.path.dirname(os.path.dirname(ckpt)), "lightning_logs", "version_0")]
    events = glob.glob(os.path.join(folders[0], "events.out.tfevents.*"))
    assert events
    accumulator = EventAccumulator(folders[0]).Reload()
    tags = set(accumulator.Tags()["scalars"])
    groups = {"lr-SGD/backbone", "lr-SGD/head", "lr-SGD/classifier"}
    assert groups <= tags and {"val_top1", "train_loss_epoch"} <= tags
    metrics = pd.read_csv(os.path.join(folders[0], "metrics.csv"))
    assert groups <= set(metrics.columns) and "val_top1" in metrics.columns
    history = torch.load(ckpt, weights_only=True)["callbacks"]
    kept = next(state["history"] for key, state in history.items() if "RunArtifacts" in key)
    # The report's curves come from the checkpoint: one learning rate per group, under the group's name.
    assert {key for key in kept[-1] if key.startswith("lr-")} == {"lr-backbone", "lr-head", "lr-classifier"}


@pytest.mark.parametrize("columns", [["lr-backbone", "lr-head"], ["lr-SGD/backbone", "lr-SGD/head"],
                                     ["lr-SGD/backbone", "lr-SGD/head", "lr-backbone", "lr-head"]])
def test_the_learning_rate_plot_draws_each_group_once(tmp_path, monkeypatch, columns):
    import pandas as pd

    from finegrained.results import plots

    drawn = []
    real = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(
        sorted(line.get_label() for line in fig.axes[2].get_lines())) or real(fig, path))
    history = pd.DataFrame({"epoch": [0, 1], "train_loss_epoch": [1.0, 0.5], **{c: [0.1, 0.01] for c in columns}})
    plots.plot_training_curves(history, str(tmp_path / "curves.png"))
    assert drawn == [["backbone", "head"]]


# ---- the output folder: never delete what the tool did not write ------------------------------------------
def _report_cli(ckpt, recipe, out, *extra):
    from finegrained.cli import entry_point

    return entry_point(["report", "--ckpt", ckpt, "--config", recipe, "--out", str(out), "--cam-images", "2",
                        "--pairs", "1", *extra])


def test_report_refuses_a_folder_of_the_users_and_changes_nothing(evil_run, tmp_path, capsys):
    recipe, ckpt, _ = evil_run
    out = tmp_path / "mine"
    (out / "images").mkdir(parents=True)
    (out / "images" / "holiday.png").write_bytes(b"a user's photo")
    (out / "index.html").write_text("a user's page")
    assert _report_cli(ckpt, recipe, out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {out}: holds files finegrained report did not write")
    assert (out / "images" / "holiday.png").read_bytes() == b"a user's photo"
    assert (out / "index.html").read_text() == "a user's page"
    assert sorted(os.listdir(out)) == ["images", "index.html"]


def _all_files(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, files in os.walk(folder) for f in files)


def test_a_report_replaces_its_previous_report_and_only_it(evil_run, tmp_path, monkeypatch):
    import json

    recipe, ckpt, _ = evil_run
    out = tmp_path / "report"
    assert _report_cli(ckpt, recipe, out, "--cam-images", "4") == 0
    first = _all_files(out)
    assert len([f for f in first if "/cam_" in f]) == 4
    assert _report_cli(ckpt, recipe, out, "--cam-images", "2") == 0
    second = _all_files(out)
    assert len([f for f in second if "/cam_" in f]) == 2  # the first report's other overlays are gone
    marker = json.loads((out / ".finegrained-report.json").read_text())
    assert sorted(marker["files"]) == [f for f in second if f != ".finegrained-report.json"]

    # A report that fails half-way leaves the previous one as it was, and no partial file.
    import finegrained.results.report as report_module

    def broken(*args, **kwargs):
        raise RuntimeError("Grad-CAM failed")

    monkeypatch.setattr(report_module, "grad_cam_maps", broken)
    with pytest.raises(RuntimeError, match="Grad-CAM failed"):
        _report_cli(ckpt, recipe, out, "--cam-images", "4")
    assert _all_files(out) == second


def _folder_recipe(tmp_path, classes):
    for split in ("train", "test"):
        for c, name in enumerate(classes):
            for i in range(2):
                write_image(str(tmp_path / "other" / split / name / f"{i}.png"), PALETTE[c], size=48, seed=i)
    recipe = tmp_path / "other.yaml"
    recipe.write_text(f"""
data:
  class_path: datamodules.ImageFolderDataModule
  init_args: {{root: {tmp_path / "other"}, val_fraction: 0.5, batch_size: 4, num_workers: 0, resize_size: 72,
              crop_size: 64}}
""")
    return str(recipe)


@pytest.mark.parametrize("classes, message", [
    (["a<b & c", "plain"], "trained for 3 classes, but the data of"),
    ([EVIL, "other", "plain"], "class 1 is 'a<b & c' in the checkpoint but 'other'"),
])
def test_report_refuses_data_of_other_classes(evil_run, tmp_path, capsys, classes, message):
    _, ckpt, _ = evil_run
    assert _report_cli(ckpt, _folder_recipe(tmp_path, classes), tmp_path / "r") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "r").exists()


def test_finegrained_test_refuses_a_checkpoint_of_other_class_names(evil_run, tmp_path, capsys):
    from finegrained.cli import entry_point

    _, ckpt, _ = evil_run
    recipe = _folder_recipe(tmp_path, [EVIL, "other", "plain"])
    with open(recipe, "a") as f:
        f.write(f"model: {{backbone: resnet18, backbone_weights: null, last_stride: 1, head: isqrt, "
                f"head_kwargs: {{reduction: 8}}}}\ntrainer: {{accelerator: cpu, logger: false, "
                f"default_root_dir: {tmp_path}}}\nruns_csv: ''\n")
    assert entry_point(["test", "--config", recipe, "--ckpt_path", ckpt]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: the checkpoint's class 1 is 'a<b & c' but the data's is 'other'"), err


@pytest.mark.parametrize("entry", ["../victim.txt", "{victim}", "images/../../victim.txt", "./index.html"])
def test_an_edited_marker_cannot_make_report_delete_outside_its_folder(evil_run, tmp_path, capsys, entry):
    import json

    recipe, ckpt, _ = evil_run
    out = tmp_path / "report"
    assert _report_cli(ckpt, recipe, out) == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("a user's file")
    marker = out / ".finegrained-report.json"
    listed = json.loads(marker.read_text())
    listed["files"].append(entry.format(victim=victim))
    marker.write_text(json.dumps(listed))
    before = _all_files(out)
    assert _report_cli(ckpt, recipe, out) == 2
    assert "is not a file inside" in capsys.readouterr().err
    assert victim.read_text() == "a user's file" and _all_files(out) == before


def test_the_kept_learning_rates_are_those_each_epoch_trained_with(trained_run, tmp_path):
    """Cosine over 2 epochs from 0.01: epoch 0 trains at 0.01 and epoch 1 at 0.005 (not the next epoch's rate)."""
    from finegrained.cli import main

    recipe, _, _ = trained_run
    assert main(["fit", "--config", recipe, "--trainer.max_epochs", "2", "--model.optim.scheduler", "cosine",
                 "--trainer.default_root_dir", str(tmp_path), "--checkpoint.dirpath", str(tmp_path / "ck"),
                 "--runs_csv", ""]) == 0
    history = next(state["history"] for key, state in torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)[
        "callbacks"].items() if "RunArtifacts" in key)
    assert [row["epoch"] for row in history] == [0, 1]
    assert [row["lr-backbone"] for row in history] == pytest.approx([0.01, 0.005])
    assert [row["lr-classifier"] for row in history] == pytest.approx([0.05, 0.025])  # classifier ×5
