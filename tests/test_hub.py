"""The Hugging Face Hub format: fit -> test -> export --format hf -> from_pretrained gives the tested model, and
the card's numbers are the run record's, recomputed here from the loaded model's logits with scikit-learn."""
import json
import os
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from sklearn.metrics import accuracy_score, balanced_accuracy_score, top_k_accuracy_score

from finegrained import FineGrainedNetwork
from finegrained.cli import entry_point, main
from finegrained.results.runs import read_runs
from tests.conftest import printed_by


@pytest.fixture(scope="module")
def hub_export(trained_run, hf_folder):
    """trained_run tested on its whole test split and exported with --format hf: (recipe, ckpt, runs.csv, folder)."""
    recipe, ckpt, _ = trained_run
    folder, runs = hf_folder
    return recipe, ckpt, runs, folder


def _test_images(recipe):
    from finegrained.cli.data import datamodule_from_config

    datamodule = datamodule_from_config(recipe)
    datamodule.setup("test")
    images, labels = zip(*datamodule.test_dataloader())
    return torch.cat(images), torch.cat(labels).numpy()


def test_the_folder_loads_back_as_the_tested_model_and_its_card_gives_the_records_numbers(hub_export):
    from finegrained.model import load_classifier

    recipe, ckpt, runs, out = hub_export
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(out):  # readable as the umask lets new files be (safetensors alone would make 0600)
        assert os.stat(os.path.join(out, name)).st_mode & 0o777 == 0o666 & ~umask, name
    classifier = load_classifier(ckpt).eval()
    network = FineGrainedNetwork.from_pretrained(out)
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["class_names"] == classifier.hparams.class_names == network.pretrained_cfg["class_names"]
    from datamodules.transforms import preprocessing_steps
    steps = config["preprocessing"].pop("steps")
    assert config["preprocessing"] == classifier.hparams.preprocessing and config["test_flip"] is True
    assert steps == preprocessing_steps(classifier.hparams.preprocessing)
    assert "backbone_weights" not in config and "init_from" not in config  # the safetensors file holds every weight

    images, labels = _test_images(recipe)
    with torch.no_grad():
        logits = network.inference_network()(images)  # flip-averaged, as finegrained test evaluates
        tested = classifier.predict_logits(images)
    assert (logits - tested).abs().max() <= 1e-6

    record = read_runs(runs).iloc[-1]
    scores = logits.numpy()
    top1 = accuracy_score(labels, scores.argmax(1))
    assert record["top1"] == pytest.approx(top1, abs=1e-6)
    if scores.shape[1] > 5:
        assert record["top5"] == pytest.approx(top_k_accuracy_score(labels, scores, k=5,
                                                                    labels=np.arange(scores.shape[1])), abs=1e-6)
    else:  # top-5 of 5 classes or fewer says nothing: not recorded, not on the card
        assert np.isnan(record["top5"])
    assert record["mean_class_acc"] == pytest.approx(balanced_accuracy_score(labels, scores.argmax(1)), abs=1e-6)

    card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "finegrained" and front["license"] == "mit"
    metrics = {m["name"]: m["value"] for m in front["model-index"][0]["results"][0]["metrics"]}
    assert metrics["top-1"] == pytest.approx(top1, abs=1e-6)
    assert re.search(rf"\| top-1 accuracy \| {top1:.4f} \|", card)
    assert f"run {record['run_id']}" in card and "Checkpoint: " in card
    assert ("top-5" in metrics) == (scores.shape[1] > 5)
    assert 'Li, Xie, Wang, Gao, "Towards Faster Training' in card  # the head's paper
    assert "1. " in card.split("## Preprocessing")[1]  # the steps that reproduce the input


def test_export_hf_prints_what_it_wrote_and_replaces_only_its_own_folder(hub_export, tmp_path, capsys):
    _, ckpt, runs, out = hub_export
    again = str(tmp_path / "copy")
    shutil.copytree(out, again)
    printed = printed_by(["export", "--ckpt", ckpt, "--format", "hf", "--out", again, "--runs-csv", runs], capsys)
    record = read_runs(runs).iloc[-1]
    assert f"model card: top-1 {record['top1']:.4f} from run {record['run_id']}" in printed
    assert re.search(r"max \|loaded - checkpoint\| logits = \d\.\d\de[-+]\d\d", printed)
    assert not [name for name in os.listdir(tmp_path) if ".partial-" in name or ".previous-" in name]

    users = tmp_path / "mine"
    users.mkdir()
    (users / "notes.txt").write_text("keep me")
    assert entry_point(["export", "--ckpt", ckpt, "--format", "hf", "--out", str(users)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {users}: holds files that are not an export of finegrained") and err.count("\n") == 1
    assert os.listdir(users) == ["notes.txt"] and (users / "notes.txt").read_text() == "keep me"


def test_the_card_cites_only_a_record_of_this_checkpoint(hub_export, tmp_path, capsys):
    _, ckpt, runs, _ = hub_export
    copy = tmp_path / "runs.csv"  # a test of another model, and a test older than the checkpoint
    records = read_runs(runs)
    other = records.iloc[[-1]].assign(run_id="other", method="bcnn", backbone="resnet50", dataset="cub", top1=0.99,
                                      checkpoint="elsewhere/best.ckpt")
    old = records.iloc[[-1]].assign(run_id="old", timestamp="2000-01-01T00:00:00+00:00")
    pd.concat([other, old]).to_csv(copy, index=False)
    printed = printed_by(["export", "--ckpt", ckpt, "--format", "hf", "--out", str(tmp_path / "m"),
                          "--runs-csv", str(copy)], capsys)
    assert "the card states no accuracy" in printed  # neither record names this checkpoint as it is now
    card = (tmp_path / "m" / "README.md").read_text()
    assert "model-index" not in card and "this card states no accuracy" in card
    for run_id, message in [("other", "tested bcnn on resnet50, but"), ("old", "is older than")]:
        assert entry_point(["export", "--ckpt", ckpt, "--format", "hf", "--out", str(tmp_path / run_id),
                            "--runs-csv", str(copy), "--run-id", run_id]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and not os.path.exists(tmp_path / run_id)
    assert entry_point(["export", "--ckpt", ckpt, "--format", "hf", "--out", str(tmp_path / "x"),
                        "--runs-csv", str(tmp_path / "typo.csv")]) == 2
    assert f"error: {tmp_path / 'typo.csv'}: not found" in capsys.readouterr().err
    assert entry_point(["export", "--ckpt", ckpt, "--format", "hf", "--out", ""]) == 2
    assert capsys.readouterr().err.startswith("error: --out is empty")


def test_loading_is_strict_and_never_unpickles(hub_export, tmp_path):
    _, _, _, out = hub_export
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "model.safetensors").write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match=r"model.safetensors: not a safetensors file \("):
        FineGrainedNetwork.from_pretrained(str(broken))

    other = tmp_path / "other"  # a config that asks for another head: the weights do not fit, nothing is guessed
    shutil.copytree(out, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "head_kwargs": {"reduction": 8}}))
    with pytest.raises(ValueError, match="not the weights of the network"):
        FineGrainedNetwork.from_pretrained(str(other))

    pickled = tmp_path / "pickled"  # only a pickle file: refused, not loaded
    shutil.copytree(out, pickled)
    os.remove(pickled / "model.safetensors")
    torch.save({}, pickled / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="model.safetensors: not found"):
        FineGrainedNetwork.from_pretrained(str(pickled))

    with pytest.raises(FileNotFoundError, match="config.json: cannot be read"):
        FineGrainedNetwork.from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not found; expected a folder written by save_pretrained"):
        FineGrainedNetwork.from_pretrained(str(tmp_path / "missing"))
    for text, message in [("{oops", "config.json: not JSON"), ("[1, 2]", "config.json: a JSON list")]:
        bad = tmp_path / f"bad{len(text)}"
        shutil.copytree(out, bad)
        (bad / "config.json").write_text(text)
        with pytest.raises(ValueError, match=message):
            FineGrainedNetwork.from_pretrained(str(bad))

    half = tmp_path / "half"  # the right names and shapes in float16: not silently widened
    shutil.copytree(out, half)
    from safetensors.torch import load_file, save_file
    tensors = load_file(os.path.join(out, "model.safetensors"))
    save_file({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, str(half / "model.safetensors"))
    with pytest.raises(ValueError, match=r"differences: .*torch.float16, expected .*torch.float32"):
        FineGrainedNetwork.from_pretrained(str(half))


def test_the_hub_path_loads_from_the_huggingface_hub_cache_offline(hub_export, tmp_path, monkeypatch):
    """A repository id goes through huggingface_hub's own hf_hub_download (here served from its cache, laid out as a
    download leaves it, with HF_HUB_OFFLINE=1): config.json and model.safetensors only."""
    _, _, _, out = hub_export
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--birds" / "snapshots" / ("0" * 40)
    shutil.copytree(out, snapshot)
    (cache / "models--someone--birds" / "refs").mkdir()
    (cache / "models--someone--birds" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    network = FineGrainedNetwork.from_pretrained("someone/birds", cache_dir=str(cache), local_files_only=True)
    local = FineGrainedNetwork.from_pretrained(out)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(network(x), local(x))
    assert network.pretrained_cfg == local.pretrained_cfg


def test_a_network_on_a_backbone_module_of_ones_own_cannot_be_saved_as_config(tmp_path):
    from tests.conftest import _tiny_cnn

    network = FineGrainedNetwork(3, backbone=_tiny_cnn("mine", None, 2), backbone_weights=None, head="gap")
    with pytest.raises(ValueError, match="backbone module of your own"):
        network.save_pretrained(str(tmp_path / "m"))


def test_save_pretrained_round_trip_of_a_plain_network(tmp_path):
    network = FineGrainedNetwork(4, backbone="tests_tiny_cnn", backbone_weights=None, head="mpncov",
                                 head_kwargs={"reduction": None}).eval()
    network.pretrained_cfg = {"class_names": list("abcd"), "test_flip": False}
    network.save_pretrained(str(tmp_path / "m"))
    loaded = FineGrainedNetwork.from_pretrained(str(tmp_path / "m"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), network(x))
    assert loaded.architecture == network.architecture and not loaded.training
