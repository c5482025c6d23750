"""The finegrained command: fit/test through LightningCLI, export (ONNX, TorchScript), predict-images."""
import csv
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from datamodules.io import load_rgb
from datamodules.transforms import eval_transform
from finegrained.cli import main
from finegrained.export import export_classifier
from finegrained.model import load_classifier
from finegrained.predict import ExportedModel, predict_images
from tests.conftest import PALETTE, REPO_ROOT, SUBPROCESS_ENV, copy_export, write_image


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "finegrained.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "fit" in out.stdout and "predict-images" in out.stdout


def test_cli_fit_wrote_checkpoint_config_and_links(trained_run):
    recipe, ckpt, _ = trained_run
    hparams = torch.load(ckpt, weights_only=True)["hyper_parameters"]
    assert hparams["num_classes"] == 3  # linked from the DataModule
    assert hparams["class_names"] == ["class_0", "class_1", "class_2"]
    assert hparams["preprocessing"]["crop"] == 64
    assert os.path.isfile(os.path.join(os.path.dirname(ckpt), "last.ckpt"))


def test_cli_test_with_checkpoint(trained_run, capsys):
    recipe, ckpt, _ = trained_run
    assert main(["test", "--config", recipe, "--ckpt_path", ckpt]) == 0
    out = capsys.readouterr().out
    assert "test_top1" in out and "test_mean_class_acc" in out


def test_cli_fast_dev_run_with_dotted_override(trained_run, tmp_path):
    recipe, _, _ = trained_run
    assert main(["fit", "--config", recipe, "--trainer.fast_dev_run", "true", "--model.head", "bcnn",
                 "--model.head_kwargs", "{}", "--trainer.default_root_dir", str(tmp_path)]) == 0


def test_cli_unknown_head_lists_known_names(trained_run):
    recipe, _, _ = trained_run
    with pytest.raises(ValueError, match="known heads: .*isqrt"):
        main(["fit", "--config", recipe, "--trainer.fast_dev_run", "true", "--model.head", "nope"])


def test_onnx_export_matches_pytorch(trained_run, tmp_path):
    _, ckpt, _ = trained_run
    out = str(tmp_path / "model.onnx")
    assert main(["export", "--ckpt", ckpt, "--format", "onnx", "--out", out]) == 0
    manifest = json.load(open(out + ".json"))
    assert manifest["class_names"] == ["class_0", "class_1", "class_2"]
    assert manifest["preprocessing"]["crop"] == 64 and manifest["sha256"]
    assert manifest["parity_max_abs_diff"] <= 1e-4
    # Independent check, on a new batch size (the batch axis is dynamic).
    import onnxruntime as ort

    model = load_classifier(ckpt)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        reference = model.predict_logits(x).numpy()  # what finegrained test evaluates: flip-averaged
    session = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got - reference).max() <= 1e-4


def test_torchscript_export_matches_pytorch(trained_run, exported_run):
    _, ckpt, _ = trained_run
    out = exported_run["torchscript"]
    assert json.load(open(out + ".json"))["format"] == "torchscript"
    x = torch.randn(5, 3, 64, 64)  # traced with 2 images: the batch axis must stay free
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(out)(x), load_classifier(ckpt).predict_logits(x), rtol=1e-5, atol=1e-5)


@pytest.fixture
def onnx_model(trained_run, exported_run):
    return trained_run[1], exported_run["onnx"]


def test_predict_images_matches_torch_and_writes_csv(onnx_model, tmp_path, capsys):
    ckpt, artifact = onnx_model
    images = [write_image(str(tmp_path / "imgs" / f"{k}.jpg"), PALETTE[k], size=80, seed=k) for k in range(3)]
    csv_path = str(tmp_path / "pred.csv")
    assert main(["predict-images", "--model", artifact, str(tmp_path / "imgs"), "--topk", "2",
                 "--csv", csv_path]) == 0
    out = capsys.readouterr().out
    assert all(p in out for p in images)
    rows = list(csv.DictReader(open(csv_path)))
    assert len(rows) == 6 and {r["rank"] for r in rows} == {"1", "2"}
    model = load_classifier(ckpt)
    transform = eval_transform(model.hparams.preprocessing)
    batch = torch.stack([transform(load_rgb(p)) for p in images])
    with torch.no_grad():
        expected = model.predict_logits(batch).argmax(1).tolist()  # as exported: flip-averaged when test_flip
    top1 = [int(r["index"]) for r in rows if r["rank"] == "1"]
    assert top1 == expected


def test_predict_images_reports_bad_files_and_keeps_going(onnx_model, tmp_path, capsys):
    _, artifact = onnx_model
    good = write_image(str(tmp_path / "good.png"), PALETTE[0], size=70)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    rows, failures = predict_images(artifact, [good, str(bad)], topk=1)
    assert [r["path"] for r in rows] == [good]
    assert failures and failures[0][0] == str(bad) and "bad.jpg" in failures[0][1]


def test_predict_refuses_tampered_artifact(onnx_model, tmp_path):
    _, artifact = onnx_model
    tampered = tmp_path / "t.onnx"
    tampered.write_bytes(open(artifact, "rb").read() + b"\0")
    (tmp_path / "t.onnx.json").write_text(open(artifact + ".json").read())
    with pytest.raises(ValueError, match="does not match its manifest"):
        ExportedModel(str(tampered))
    os.remove(tmp_path / "t.onnx.json")
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        ExportedModel(str(tampered))


def test_data_samples_command(trained_run, tmp_path):
    recipe, _, _ = trained_run
    assert main(["data", "samples", "--config", recipe, "--split", "test", "--n", "4", "--out", str(tmp_path / "s")]) == 0
    files = sorted(f for f in os.listdir(tmp_path / "s") if not f.startswith("."))  # its marker file aside
    assert len(files) == 4 and files[0].startswith("00_class_0") and files[1].startswith("01_class_1")


def test_predict_images_skips_a_decompression_bomb_and_keeps_the_other_predictions(onnx_model, tmp_path, capsys):
    from tests.datamodules.test_inputs import write_bomb

    _, artifact = onnx_model
    good = [write_image(str(tmp_path / "imgs" / f"{k}.jpg"), PALETTE[k], size=70, seed=k) for k in range(2)]
    bomb = write_bomb(tmp_path / "imgs" / "huge.png")
    csv_path = str(tmp_path / "pred.csv")
    assert main(["predict-images", "--model", artifact, str(tmp_path / "imgs"), "--topk", "1", "--csv", csv_path]) == 2
    err = capsys.readouterr().err
    assert f"error: {bomb}: image of 400000000 pixels" in err and "Traceback" not in err
    assert sorted(r["path"] for r in csv.DictReader(open(csv_path))) == good


def test_predict_images_turns_images_upright_as_the_manifest_says(onnx_model, tmp_path):
    from PIL import Image, ImageOps

    from tests.datamodules.test_inputs import write_rotated_photo

    ckpt, artifact = onnx_model
    manifest = json.load(open(artifact + ".json"))
    trained = load_classifier(ckpt).hparams.preprocessing
    assert {k: manifest["preprocessing"][k] for k in trained} == trained  # copied unchanged, steps added
    assert manifest["preprocessing"]["exif_transpose"] is False
    photo = str(tmp_path / "photo.jpg")
    write_rotated_photo(photo)
    spec = manifest["preprocessing"]
    transform = eval_transform(spec)
    with Image.open(photo) as image:
        stored, upright = transform(image.convert("RGB")), transform(ImageOps.exif_transpose(image).convert("RGB"))
    assert not torch.equal(stored, upright)
    torch.testing.assert_close(ExportedModel(artifact).preprocess(photo), stored, rtol=0, atol=0)
    # A manifest without the key (and an artifact saying false): the stored pixels.
    copy = tmp_path / "without_key.onnx"
    copy.write_bytes(open(artifact, "rb").read())
    json.dump({**manifest, "preprocessing": {k: v for k, v in spec.items() if k != "exif_transpose"}},
              open(str(copy) + ".json", "w"))
    torch.testing.assert_close(ExportedModel(str(copy)).preprocess(photo), stored, rtol=0, atol=0)
    # A model trained with exif_transpose exports it, and predict-images turns the photo upright.
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["hyper_parameters"]["preprocessing"]["exif_transpose"] = True
    torch.save(checkpoint, tmp_path / "upright.ckpt")
    export_classifier(str(tmp_path / "upright.ckpt"), "onnx", str(tmp_path / "upright.onnx"))
    torch.testing.assert_close(ExportedModel(str(tmp_path / "upright.onnx")).preprocess(photo), upright, rtol=0,
                               atol=0)


def test_samples_by_class_and_predict_images_report_the_true_accuracy(onnx_model, tmp_path, capsys):
    """Classes '..', 'a b' and 'a-b': each gets its own folder inside --out, and predict-images maps every folder
    back to its class, so its accuracy is the model's accuracy on those images."""
    from sklearn.metrics import accuracy_score

    ckpt, _ = onnx_model
    classes = ["..", "a b", "a-b"]
    rows = []
    for split in ("train", "test"):
        for c in range(3):
            for i in range(2):
                name = f"{split}_{c}_{i}.jpg"
                write_image(str(tmp_path / "img" / name), PALETTE[(c + i) % 3], size=72, seed=c * 10 + i)
                rows.append((split, f"{name},{c}"))
    for split in ("train", "test"):
        (tmp_path / f"{split}.csv").write_text("\n".join(row for s, row in rows if s == split) + "\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"data": {"class_path": "datamodules.CSVDataModule", "init_args": {
        "image_root": str(tmp_path / "img"), "train_csv": str(tmp_path / "train.csv"),
        "test_csv": str(tmp_path / "test.csv"), "class_names": classes, "num_workers": 0}}}))
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    relabelled = str(model_dir / "m.onnx")  # the tiny model, its outputs named after these classes
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["hyper_parameters"]["class_names"] = classes
    torch.save(checkpoint, model_dir / "relabelled.ckpt")
    export_classifier(str(model_dir / "relabelled.ckpt"), "onnx", relabelled)

    out = tmp_path / "deep" / "samples"
    assert main(["data", "samples", "--config", str(recipe), "--split", "test", "--n", "6", "--by-class",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    assert os.listdir(tmp_path / "deep") == ["samples"]
    assert sorted(os.listdir(out)) == [".finegrained-samples.json", "a-b", "a-b-806c5cd3", "class-9608161c"]
    model = ExportedModel(relabelled)
    files = sorted(glob.glob(str(out / "*" / "*.png")), key=os.path.basename)
    assert len(files) == 6
    truth = [k % 3 for k in range(6)]  # written round-robin over the classes, in label order
    predicted = [int(model(model.preprocess(f)[None]).argmax()) for f in files]
    assert main(["predict-images", "--model", relabelled, str(out), "--topk", "1"]) == 0
    printed = capsys.readouterr().out
    assert f"Accuracy on 6 labelled images: top-1 {accuracy_score(truth, predicted):.4f}," in printed


# ---- the manifest: what it promises is what the artifact embeds -------------------------------------------------
def _copy_export(artifact, folder, edit=None):
    """A copy of the export in ``folder`` whose manifest ``edit`` changes (in place)."""
    import json
    import shutil

    target = os.path.join(folder, os.path.basename(artifact))
    shutil.copy(artifact, target)
    manifest = json.load(open(artifact + ".json"))
    if edit:
        edit(manifest)
    with open(target + ".json", "w") as f:
        json.dump(manifest, f)
    return target


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["class_names"].reverse(), "class_names differ from those embedded"),
    (lambda m: m["preprocessing"].update(resize=96), "preprocessing differ from those embedded"),
    (lambda m: m["output"].update(flip_averaged=not m["output"]["flip_averaged"]), "flip_averaged differ"),
    (lambda m: m["class_names"].append("extra"), "class_names differ"),
    (lambda m: m.pop("preprocessing"), "preprocessing lacks resize, crop, mean, std"),
    (lambda m: m.update(format="tflite"), "format 'tflite'; expected one of onnx, torchscript"),
    (lambda m: m.update(class_names="a,b"), "class_names must be a non-empty list of strings"),
])
def test_an_edited_manifest_is_refused_in_one_line(onnx_model, tmp_path, capsys, edit, message):
    from finegrained.cli import entry_point

    _, artifact = onnx_model
    copy = _copy_export(artifact, str(tmp_path), edit)
    image = write_image(str(tmp_path / "imgs" / "a.png"), PALETTE[0], size=70)
    assert entry_point(["predict-images", "--model", copy, image]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {copy}") and message in err[0], err


def test_the_contract_is_embedded_in_both_formats(onnx_model, exported_run, tmp_path):
    from finegrained.export import embedded_contract

    ckpt, artifact = onnx_model
    script = exported_run["torchscript"]
    model = load_classifier(ckpt)
    for path, fmt in ((artifact, "onnx"), (script, "torchscript")):
        embedded = embedded_contract(path, fmt)
        assert embedded["class_names"] == model.hparams.class_names
        assert embedded["flip_averaged"] is True
        assert embedded["preprocessing"]["resize"] == model.hparams.preprocessing["resize"]
        ExportedModel(path)  # its own manifest agrees
    os.makedirs(tmp_path / "edited")
    swapped = _copy_export(script, str(tmp_path / "edited"), lambda m: m["class_names"].reverse())
    with pytest.raises(ValueError, match="class_names differ"):
        ExportedModel(swapped)


def _documented_client():
    """The ONNX client the documentation shows (docs/guide/export.md)."""
    text = open(os.path.join(REPO_ROOT, "docs", "guide", "export.md"), encoding="utf-8").read()
    after = text.split("**A client with only onnxruntime, PIL and numpy.**", 1)[1]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


def _client_images(folder):
    """JPEGs large enough to be draft-decoded, one rotated by EXIF, a PNG with alpha, grey and palette images."""
    from PIL import Image

    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for k, (w, h) in enumerate([(640, 480), (300, 700), (97, 131)]):
        pixels = np.clip(np.array(PALETTE[k])[None, None] + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
        paths.append(os.path.join(folder, f"photo{k}.jpg"))
        Image.fromarray(pixels).save(paths[-1], quality=92)
    rotated = Image.open(paths[0])
    exif = rotated.getexif()
    exif[0x0112] = 6
    paths.append(os.path.join(folder, "rotated.jpg"))
    rotated.save(paths[-1], exif=exif, quality=92)
    rgba = np.concatenate([rng.integers(0, 255, (90, 110, 3)), np.full((90, 110, 1), 200)], axis=2).astype(np.uint8)
    paths.append(os.path.join(folder, "alpha.png"))
    Image.fromarray(rgba, "RGBA").save(paths[-1])
    paths.append(os.path.join(folder, "grey.jpg"))
    Image.fromarray(rng.integers(0, 255, (200, 150), dtype=np.uint8), "L").save(paths[-1])
    paths.append(os.path.join(folder, "palette.png"))
    Image.fromarray(rng.integers(0, 255, (80, 80, 3), dtype=np.uint8)).convert("P").save(paths[-1])
    return paths


@pytest.mark.parametrize("upright_and_banner", [False, True])
def test_the_documented_client_reproduces_predict_images(trained_run, exported_run, tmp_path, upright_and_banner):
    """The documented client, run as a script with onnxruntime, PIL and numpy, prints the class and probability
    predict-images writes, also for a model whose preprocessing removes a banner and turns images upright."""
    import subprocess
    import sys

    _, ckpt, _ = trained_run
    if upright_and_banner:
        checkpoint = torch.load(ckpt, weights_only=True)
        checkpoint["hyper_parameters"]["preprocessing"].update(bottom_crop=7, exif_transpose=True)
        ckpt = str(tmp_path / "edited.ckpt")
        torch.save(checkpoint, ckpt)
        artifact = str(tmp_path / "model.onnx")
        export_classifier(ckpt, "onnx", artifact)
    else:
        artifact = exported_run["onnx"]
    images = _client_images(str(tmp_path / "imgs"))
    rows, failures = predict_images(artifact, images, topk=1, csv_path=str(tmp_path / "p.csv"))
    assert not failures
    (tmp_path / "client.py").write_text(_documented_client())
    done = subprocess.run([sys.executable, str(tmp_path / "client.py"), artifact] + images, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    printed = [line.rsplit(" ", 2) for line in done.stdout.strip().splitlines()]
    assert [p[0] for p in printed] == images
    for (path, name, probability), row in zip(printed, rows):
        assert (path, name) == (row["path"], row["class"])
        assert float(probability) == pytest.approx(row["probability"], abs=2e-6), path


# ---- exports and predictions never overwrite a user's file, never leave a partial one ----------------------------
def test_export_refuses_a_users_file_and_replaces_its_own(trained_run, exported_run, tmp_path, capsys):
    from finegrained.cli import entry_point

    _, ckpt, _ = trained_run
    users = tmp_path / "model.onnx"
    users.write_bytes(b"a user's model")
    (tmp_path / "other.onnx.json").write_text("a user's notes")
    for out in (users, tmp_path / "other.onnx"):
        assert entry_point(["export", "--ckpt", ckpt, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {out}: already exists and is not an export"), err
    assert users.read_bytes() == b"a user's model" and (tmp_path / "other.onnx.json").read_text() == "a user's notes"
    ours = copy_export(exported_run["onnx"], tmp_path)  # a previous export of this tool is replaced
    previous = os.stat(ours).st_ino
    assert entry_point(["export", "--ckpt", ckpt, "--out", ours]) == 0
    assert os.stat(ours).st_ino != previous
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.json", "model.onnx", "other.onnx.json"]


_FULL_DISK_EXPORT = r"""
import resource, signal, sys
from finegrained.cli import entry_point
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as a full disk fails
resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))
sys.exit(entry_point(["export", "--ckpt", sys.argv[1], "--format", sys.argv[2], "--out", sys.argv[3]]))
"""


@pytest.mark.parametrize("fmt, name", [("onnx", "m.onnx"), ("torchscript", "m.pt")])
def test_an_export_that_cannot_be_written_leaves_the_previous_one_and_no_partial_file(trained_run, exported_run,
                                                                                       tmp_path, fmt, name):
    _, ckpt, _ = trained_run
    out = tmp_path / name
    assert copy_export(exported_run[fmt], tmp_path) == str(out)  # the previous export
    before = {f: open(tmp_path / f, "rb").read() for f in os.listdir(tmp_path)}
    done = subprocess.run([sys.executable, "-c", _FULL_DISK_EXPORT, ckpt, fmt, str(out)], capture_output=True,
                          text=True, timeout=300, env=SUBPROCESS_ENV)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 2 and len(errors) == 1, done.stderr[-2000:]
    assert errors[0].startswith(f"error: {out}: could not write the {fmt} model"), errors
    assert {f: open(tmp_path / f, "rb").read() for f in os.listdir(tmp_path)} == before


@pytest.mark.parametrize("damage", ["other format", "random bytes"])
def test_an_unreadable_artifact_is_one_line(onnx_model, tmp_path, capsys, damage):
    from finegrained.cli import entry_point
    from finegrained.export import sha256_file

    _, artifact = onnx_model
    copy = tmp_path / "m.onnx"
    copy.write_bytes(os.urandom(4096) if damage == "random bytes" else open(artifact, "rb").read())
    manifest = json.load(open(artifact + ".json"))
    manifest["sha256"] = sha256_file(str(copy))
    if damage == "other format":
        manifest["format"] = "torchscript"
    json.dump(manifest, open(str(copy) + ".json", "w"))
    image = write_image(str(tmp_path / "a.png"), PALETTE[0], size=70)
    assert entry_point(["predict-images", "--model", str(copy), image]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {copy}: not a readable"), err


def test_predict_images_never_overwrites_a_users_csv(onnx_model, tmp_path, capsys):
    from finegrained.cli import entry_point

    _, artifact = onnx_model
    image = write_image(str(tmp_path / "a.png"), PALETTE[0], size=70)
    users = tmp_path / "results.csv"
    users.write_text("name,score\nmine,1\n")
    assert entry_point(["predict-images", "--model", artifact, image, "--csv", str(users)]) == 2
    assert "already exists and is not a predictions file" in capsys.readouterr().err
    assert users.read_text() == "name,score\nmine,1\n"
    ours = tmp_path / "predictions.csv"
    for _ in range(2):  # its own predictions are replaced
        assert entry_point(["predict-images", "--model", artifact, image, "--csv", str(ours)]) == 0
    assert entry_point(["predict-images", "--model", artifact, image, "--topk", "0"]) == 2
    assert "--topk and --batch-size must be at least 1" in capsys.readouterr().err


def test_data_samples_refuses_a_users_folder_and_never_mixes_old_and_new(trained_run, tmp_path, capsys):
    from finegrained.cli import entry_point

    recipe, _, _ = trained_run
    users = tmp_path / "mine"
    (users / "a-b").mkdir(parents=True)
    (users / "a-b" / "0002.png").write_text("precious")
    argv = ["data", "samples", "--config", recipe, "--split", "test", "--by-class"]
    assert entry_point(argv + ["--n", "6", "--out", str(users)]) == 2
    assert "holds files finegrained samples did not write" in capsys.readouterr().err
    assert (users / "a-b" / "0002.png").read_text() == "precious"
    out = tmp_path / "samples"
    assert entry_point(argv + ["--n", "6", "--out", str(out)]) == 0
    assert entry_point(argv + ["--n", "3", "--out", str(out)]) == 0
    assert len(glob.glob(str(out / "*" / "*.png"))) == 3  # the second call's samples only
