"""The exported model is the tested model: flip averaging, JPEG decoding and accuracy as `finegrained test` has them."""
import pytest
import torch


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_includes_the_flip_average_of_finegrained_test(fmt, tmp_path):
    from finegrained.export import export_classifier
    from finegrained.model import load_classifier
    from finegrained.predict import ExportedModel
    from tests.heads.test_heads_end_to_end import head_checkpoint

    ckpt = head_checkpoint("isqrt", str(tmp_path))
    out = str(tmp_path / f"m.{fmt}")
    manifest = export_classifier(ckpt, fmt, out)
    assert manifest["output"]["flip_averaged"] is True
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = load_classifier(ckpt).predict_logits(images).numpy()
        unflipped = load_classifier(ckpt)(images).numpy()
    exported = ExportedModel(out)(images)
    assert abs(exported - expected).max() <= 1e-4
    assert abs(unflipped - expected).max() > 1e-3  # the flip matters on these inputs, so the check can fail


def test_predict_images_decodes_exactly_like_the_test_loader(exported_run, tmp_path):
    """Large JPEGs are draft-decoded by the loaders; predict-images must do the same."""
    import numpy as np
    from PIL import Image

    from datamodules import ImageFolderDataModule
    from finegrained.predict import ExportedModel

    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for c in range(3):
            folder = tmp_path / "big" / split / f"class_{c}"
            folder.mkdir(parents=True)
            pixels = rng.integers(0, 255, (600, 800, 3), dtype=np.uint8)
            Image.fromarray(pixels).resize((1600, 1200)).save(folder / "photo.jpg", quality=90)
    dm = ImageFolderDataModule(str(tmp_path / "big"), batch_size=2, num_workers=0, resize_size=72, crop_size=64)
    dm.setup("test")
    model = ExportedModel(exported_run["torchscript"])
    for index, (path, _) in enumerate(dm.test_dataset.samples):
        torch.testing.assert_close(model.preprocess(path), dm.test_dataset[index][0], rtol=0, atol=0)


_debian_fashion = pytest.mark.skipif(
    not __import__("os").path.isfile("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"),
    reason="Debian package dataset-fashion-mnist is not installed (make setup installs it as root)")


@_debian_fashion
def test_labelled_folder_accuracy_equals_finegrained_test_on_the_demo_images(tmp_path, capsys):
    import os
    import re

    from finegrained.cli import main
    from tests.conftest import printed_by

    demo = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "recipes", "demo.yaml"))
    recipe = tmp_path / "small_demo.yaml"
    recipe.write_text(f"base: [{demo}]\ndata:\n  init_args: {{subset_per_class: 3, val_per_class: 1, "
                      f"test_per_class: 6, image_size: 48}}\n")
    small = ["--config", str(recipe), "--trainer.default_root_dir", str(tmp_path),
             "--checkpoint.dirpath", str(tmp_path / "ck"), "--runs_csv", ""]
    assert main(["fit", *small, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1"]) == 0
    ckpt = str(tmp_path / "ck" / "last.ckpt")
    tested = re.search(r"Test accuracy on 60 images: top-1 ([0-9.]+), .*mean per-class ([0-9.]+)",
                       printed_by(["test", *small, "--ckpt_path", ckpt], capsys))
    samples = str(tmp_path / "labelled")
    assert main(["data", "samples", "--config", str(recipe), "--split", "test", "--n", "60", "--by-class",
                 "--out", samples]) == 0
    onnx = str(tmp_path / "m.onnx")
    assert main(["export", "--ckpt", ckpt, "--format", "onnx", "--out", onnx]) == 0
    predicted = re.search(r"Accuracy on 60 labelled images: top-1 ([0-9.]+), mean per-class ([0-9.]+)",
                          printed_by(["predict-images", "--model", onnx, samples, "--topk", "1"], capsys))
    assert tested and predicted, "both commands print their accuracy"
    assert predicted.groups() == tested.groups()
