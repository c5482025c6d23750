"""Bad input: matrix heads that never crash on it, and every error of the command line in one line."""
import logging

import pytest
import scipy.linalg
import torch

from finegrained.cli import main
from finegrained.heads import build_head
from tests.conftest import REPO_ROOT, make_image_folder

EIG_HEADS = ("mpncov", "o2p", "g2de")


def _cases():
    g = torch.Generator().manual_seed(0)
    live = torch.zeros(4, 32, 7, 7)
    live[:, 3] = torch.rand(4, 7, 7, generator=g)
    repeated = torch.tensor(scipy.linalg.hadamard(32)[:, :16], dtype=torch.float32).T.reshape(1, 16, 32)
    return {
        "constant map": torch.ones(4, 32, 7, 7),
        "scaled 1e-12": torch.rand(4, 32, 7, 7, generator=g) * 1e-12,
        "scaled 1e12": torch.rand(4, 32, 7, 7, generator=g) * 1e12,
        "one live channel": live,
        "repeated eigenvalues": torch.cat([repeated, repeated]).repeat(1, 2, 1).reshape(2, 32, 4, 8),
        "M < C": torch.rand(4, 32, 2, 3, generator=g),
    }


@pytest.mark.parametrize("case", list(_cases()))
@pytest.mark.parametrize("name", EIG_HEADS)
def test_eigendecomposition_heads_train_on_anything(name, case):
    """Training mode, default head arguments (mpncov's BN reduction included): finite values and gradients."""
    head = build_head(name, 32).train()
    x = _cases()[case].clone().requires_grad_(True)
    out = head(x)
    (out * torch.randn_like(out)).sum().backward()
    assert torch.isfinite(out).all(), (name, case)
    assert torch.isfinite(x.grad).all(), (name, case)
    for p in head.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), (name, case)


def test_eigh_result_does_not_depend_on_the_scale():
    from finegrained.ops import eig_power

    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 8, 20, generator=g, dtype=torch.float64)
    sigma = x @ x.transpose(1, 2) / 20
    for scale in (1e-30, 1e30):
        torch.testing.assert_close(eig_power(sigma * scale, 0.5) / scale ** 0.5, eig_power(sigma, 0.5))


@pytest.mark.parametrize("failures", [1, 2])
def test_a_failed_eigh_is_retried_and_logged_once(monkeypatch, caplog, failures):
    """The first ``failures`` attempts of every call fail: float32 (then float64) and the ridge take over."""
    from finegrained.ops import eig as eig_module

    real = torch.linalg.eigh
    calls = []

    def flaky(matrix):
        calls.append(matrix.dtype)
        if len(calls) <= failures:
            raise torch.linalg.LinAlgError("linalg.eigh: failed to converge")
        return real(matrix)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    monkeypatch.setattr(eig_module, "_reported", set())
    caplog.set_level(logging.WARNING)
    x = torch.rand(2, 6, 10, generator=torch.Generator().manual_seed(0))
    sigma = x @ x.transpose(1, 2) / 10
    for _ in range(3):
        lam, u = eig_module.symmetric_eigh(sigma)
        calls.clear()
    reference = real(sigma.double())[0].float()
    torch.testing.assert_close(lam, reference, rtol=1e-4, atol=1e-5)
    assert torch.allclose(u @ torch.diag_embed(lam) @ u.transpose(1, 2), sigma, atol=1e-4)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("retrying in float64" in m for m in messages) == 1
    assert sum("ridge" in m for m in messages) == failures - 1


# ---- a bad input on the command line is one clean line ---------------------------------------------------------
def _one_line_error(capsys, argv, monkeypatch=None, code=2):
    from finegrained.cli import entry_point

    assert entry_point(argv) == code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err[-2000:]
    return errors[0]


def _fit(recipe, tmp_path, *extra):
    return ["fit", "--config", recipe, "--trainer.fast_dev_run", "true", "--trainer.default_root_dir", str(tmp_path),
            "--runs_csv", "", *extra]


def test_the_issues_command_prints_one_line_and_exits_2():
    import os
    import subprocess

    from tests.conftest import finegrained_command

    root = REPO_ROOT
    recipe = os.path.join(root, "recipes/cub/isqrt_resnet50.yaml")
    command = finegrained_command() + ["fit", "--config", recipe, "--data.init_args.root", "/no/such/dir"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "error: CUB-200-2011 root '/no/such/dir' does not exist" in out.stderr.splitlines()
    assert "Traceback" not in out.stderr


def test_bad_inputs_are_one_line(trained_run, tmp_path, capsys):
    from tests.replicas import write_aircraft, write_cub

    recipe, ckpt, _ = trained_run
    cub = write_cub(str(tmp_path / "cub"), n_classes=2, per_class=2)
    aircraft = write_aircraft(str(tmp_path / "aircraft"), variants=["707-320", "A300B4"], n_images=4)
    as_cub = ["--data", "datamodules.CUB200DataModule", "--data.init_args.num_workers", "0",
              "--data.init_args.val_fraction", "0", "--data.init_args.resize_size", "72",
              "--data.init_args.crop_size", "64"]
    cases = {
        "missing root": (_fit(recipe, tmp_path, "--data.init_args.root", str(tmp_path / "nowhere")), "does not exist"),
        "wrong layout": (_fit(recipe, tmp_path, *as_cub, "--data.init_args.root", aircraft),
                         "CUB-200-2011 not found under"),
        "unknown head": (_fit(recipe, tmp_path, "--model.head", "nope"), "unknown head 'nope'; known heads"),
        "unknown backbone": (_fit(recipe, tmp_path, "--model.backbone", "resnet5"), "unknown backbone 'resnet5'"),
        "another class count": (["test", "--config", recipe, "--ckpt_path", ckpt, "--runs_csv", "", *as_cub,
                                 "--data.init_args.root", cub], "trained for 3 classes but the data has 2"),
    }
    import os

    broken = write_cub(str(tmp_path / "broken"), n_classes=2, per_class=2)
    os.remove(os.path.join(broken, "train_test_split.txt"))
    cases["missing annotation file"] = (_fit(recipe, tmp_path, *as_cub, "--data.init_args.root", broken),
                                        "train_test_split.txt")
    for case, (argv, message) in cases.items():
        line = _one_line_error(capsys, argv)
        assert message in line, (case, line)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_corrupt_image_is_one_line_also_from_a_worker(image_folder, trained_run, tmp_path, capsys, workers):
    import glob

    recipe, _, _ = trained_run
    for path in glob.glob(f"{image_folder}/*/*/*"):
        open(path, "wb").write(b"not an image")
    line = _one_line_error(capsys, _fit(recipe, tmp_path, "--data.init_args.root", image_folder,
                                        "--data.init_args.num_workers", str(workers)))
    assert "not a readable image" in line and image_folder in line
    assert "skip_corrupt true skips unreadable images; finegrained data verify lists them all" in line


def test_a_label_out_of_range_is_one_line(tmp_path, capsys, trained_run):
    from tests.conftest import PALETTE, write_image

    recipe, _, _ = trained_run
    for split in ("train", "test"):
        for k in range(3):
            write_image(str(tmp_path / "img" / f"{split}{k}.jpg"), PALETTE[k])
    (tmp_path / "train.csv").write_text("train0.jpg,0\ntrain1.jpg,1\ntrain2.jpg,7\n")
    (tmp_path / "test.csv").write_text("test0.jpg,0\ntest1.jpg,1\n")
    line = _one_line_error(capsys, _fit(recipe, tmp_path, "--data", "datamodules.CSVDataModule",
                                        "--data.init_args.image_root", str(tmp_path / "img"),
                                        "--data.init_args.train_csv", str(tmp_path / "train.csv"),
                                        "--data.init_args.test_csv", str(tmp_path / "test.csv"),
                                        "--data.init_args.class_names", "[a, b]"))
    assert "train.csv" in line and "7" in line


def test_debug_shows_the_traceback_and_programming_errors_keep_theirs(trained_run, tmp_path, monkeypatch):
    from finegrained import network as network_module
    from finegrained.cli import entry_point

    recipe, _, _ = trained_run
    argv = _fit(recipe, tmp_path, "--data.init_args.root", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError):
        entry_point(argv + ["--debug"])
    monkeypatch.setenv("FINEGRAINED_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        entry_point(argv)
    monkeypatch.delenv("FINEGRAINED_DEBUG")

    def broken(*args, **kwargs):
        raise TypeError("a bug")

    monkeypatch.setattr(network_module, "build_head", broken)
    with pytest.raises(TypeError, match="a bug"):
        entry_point(_fit(recipe, tmp_path))


# ---- checkpoints that cannot be read, in every command that reads one ----------------------------------------
def _bad_checkpoints(folder, good):
    import os

    import torch

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    data = open(good, "rb").read()
    files = {"empty": b"", "random": os.urandom(4096), "truncated": data[: len(data) // 2]}
    paths = {}
    for name, content in files.items():
        paths[name] = os.path.join(folder, f"{name}.ckpt")
        open(paths[name], "wb").write(content)
    paths["pickle"] = os.path.join(folder, "pickle.ckpt")
    torch.save({"state_dict": {}, "hyper_parameters": {}, "payload": Evil()}, paths["pickle"])
    paths["state dict"] = os.path.join(folder, "weights.ckpt")
    torch.save({"w": torch.ones(2)}, paths["state dict"])
    return paths


EXPECTED = {"empty": "file is empty (0 bytes)", "random": "not a readable PyTorch checkpoint",
            "truncated": "not a readable PyTorch checkpoint", "pickle": "holds a pickled Python object (print)",
            "state dict": "not a"}


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_a_bad_checkpoint_is_one_line_in_test(trained_run, tmp_path, capsys, kind):
    recipe, ckpt, _ = trained_run
    path = _bad_checkpoints(str(tmp_path), ckpt)[kind]
    line = _one_line_error(capsys, ["test", "--config", recipe, "--ckpt_path", path, "--runs_csv", ""])
    assert line.startswith(f"error: {path}: ") and EXPECTED[kind] in line, line
    assert "this must never run" not in capsys.readouterr().out


@pytest.mark.parametrize("command", ["fit --ckpt_path", "init_from", "export", "report"])
@pytest.mark.parametrize("kind", ["random", "pickle"])
def test_a_bad_checkpoint_is_one_line_in_every_command(trained_run, tmp_path, capsys, command, kind):
    recipe, ckpt, _ = trained_run
    path = _bad_checkpoints(str(tmp_path), ckpt)[kind]
    argv = {"fit --ckpt_path": _fit(recipe, tmp_path, "--ckpt_path", path),
            "init_from": _fit(recipe, tmp_path, "--model.init_from", path),
            "export": ["export", "--ckpt", path, "--out", str(tmp_path / "model.onnx")],
            "report": ["report", "--ckpt", path, "--config", recipe, "--out", str(tmp_path / "report")]}[command]
    line = _one_line_error(capsys, argv)
    assert line.startswith(f"error: {path}: ") and EXPECTED[kind] in line, line
    assert not (tmp_path / "model.onnx").exists() and not (tmp_path / "report").exists()


# ---- recipes and head arguments ----------------------------------------------------------------------------
RECIPE_CASES = {
    "typo key": ("model:\n  lrr: 0.1\n", [], "{recipe}: model.lrr is not a setting of finegrained fit (did you mean "
                                              "model.optim.lr?)"),
    "a moved setting on the command line": ("", ["--model.lr", "0.1"], "the command line: model.lr is not a setting "
                                                                       "of finegrained fit (did you mean "
                                                                       "model.optim.lr?)"),
    "a stage-1 batch of 0": ("stage1:\n  route: cached\n  epochs: 1\n  batch_size: 0\n", [],
                             "{recipe}: stage1.batch_size: must be >= 1, got 0"),
    "a stage-1 route on the command line": ("", ["--stage1.route", "sideways"],
                                            "the command line: stage1.route: must be one of frozen, cached, got "
                                            "'sideways'"),
    "a setting that moved": ("model:\n  stage1_epochs: 3\n", [], "{recipe}: model.stage1_epochs is not a setting of "
                                                                   "finegrained fit (did you mean stage1.epochs?)"),
    "wrong type": ("model:\n  optim:\n    lr: fast\n", [], "{recipe}: model.optim.lr: expected float, got fast"),
    "an argument the data refuses": ("data:\n  init_args:\n    train_crop: diagonal\n", [],
                                     "{recipe}: datamodules.ImageFolderDataModule: train_crop must be one of "
                                     "('random', 'center'), got 'diagonal'"),
    "typo in the data's arguments": ("data:\n  init_args:\n    batch_sise: 3\n", [],
                                     "{recipe}: data.init_args.batch_sise is not an argument of "
                                     "datamodules.ImageFolderDataModule"),
    "wrong type on the command line": ("", ["--trainer.max_epochs", "many"],
                                       "the command line: trainer.max_epochs: expected int or null, got many"),
    "negative reduction": ("", ["--model.head_kwargs", "{reduction: -16}"],
                           "head 'isqrt': reduction must be a positive integer, got -16"),
    "unknown head argument": ("", ["--model.head_kwargs", "{reductio: 16}"],
                              "head 'isqrt' has no argument 'reductio'; its arguments: reduction=256, iterations=5"),
}


@pytest.mark.parametrize("case", list(RECIPE_CASES))
def test_a_bad_setting_names_its_file_and_key_in_one_line(trained_run, tmp_path, capsys, case):
    """The recipe's own error comes from a second recipe layered over the working one (as a base would be)."""
    recipe, _, _ = trained_run
    text, extra, expected = RECIPE_CASES[case]
    layered = tmp_path / "layer.yaml"
    layered.write_text(text or "{}\n")
    argv = _fit(recipe, tmp_path, "--config", str(layered), *extra)
    from finegrained.cli import entry_point

    assert entry_point(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {expected.format(recipe=layered)}"], err[-2000:]
    assert "usage:" not in err and "Traceback" not in err


def test_a_bad_setting_in_a_base_recipe_names_the_base(tmp_path, capsys):
    from finegrained.cli import entry_point

    (tmp_path / "base.yaml").write_text("model:\n  optim:\n    lr: fast\n")
    (tmp_path / "recipe.yaml").write_text("base: [base.yaml]\ndata:\n  class_path: datamodules.ImageFolderDataModule\n"
                                         "  init_args: {root: /nowhere}\n")
    assert entry_point(["fit", "--config", str(tmp_path / "recipe.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and err[-1].endswith("base.yaml: model.optim.lr: expected float, got fast"), err


def test_the_datamodules_messages_are_shown(image_folder, trained_run, tmp_path, capsys):
    """Which split validates, files that are not images: the DataModules' log messages reach the user."""
    from finegrained.cli import main

    recipe, _, _ = trained_run
    (tmp_path / "data").mkdir()
    import shutil

    shutil.copytree(image_folder, tmp_path / "data" / "f")
    (tmp_path / "data" / "f" / "train" / "class_0" / "notes.txt").write_text("not an image")
    assert main(_fit(recipe, tmp_path, "--data.init_args.root", str(tmp_path / "data" / "f"))) == 0
    err = capsys.readouterr().err
    assert "warning: " in err and "ignoring 1 file(s) that are not images" in err and "notes.txt" in err


def test_help_lists_every_command(capsys):
    from finegrained.cli import TOOLS, main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for command in list(TOOLS) + ["fit", "validate", "test", "predict"]:
        assert command in text, command
    assert "report" in text


@pytest.mark.parametrize("command", ["test", "export"])
def test_a_checkpoint_whose_weights_do_not_fit_is_one_line(trained_run, tmp_path, capsys, command):
    """A checkpoint of a layer this version does not have (e.g. SR-SOP's convolutions with a bias, as an earlier
    version trained them) is refused in one line, before any result, instead of a traceback."""
    import torch

    recipe, ckpt, _ = trained_run
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["state_dict"]["network.head.reduce.0.bias"] = torch.zeros(16)
    path = str(tmp_path / "old.ckpt")
    torch.save(checkpoint, path)
    argv = {"test": ["test", "--config", recipe, "--ckpt_path", path, "--runs_csv", str(tmp_path / "runs.csv")],
            "export": ["export", "--ckpt", path, "--out", str(tmp_path / "model.onnx")]}[command]
    line = _one_line_error(capsys, argv)
    assert line.startswith(f"error: {path}: the checkpoint's weights do not fit this model (unexpected "
                           f"network.head.reduce.0.bias)") and "--model.init_from" in line, line
    assert not (tmp_path / "runs.csv").exists() and not (tmp_path / "model.onnx").exists()


def test_a_checkpoint_of_an_earlier_version_is_named_in_test_and_still_exports(trained_run, tmp_path, capsys):
    """Its hyper-parameters use settings that moved (model.lr, model.stage1_epochs): `test` says so in one line
    naming the file; `export` (which rebuilds the network from the checkpoint) still reads it."""
    import torch

    recipe, ckpt, _ = trained_run
    checkpoint = torch.load(ckpt, weights_only=True)
    hparams = checkpoint["hyper_parameters"]
    hparams.update(lr=hparams.pop("optim")["lr"], stage1_epochs=0)
    checkpoint["state_dict"] = {k[len("network."):]: v for k, v in checkpoint["state_dict"].items()}
    path = str(tmp_path / "earlier.ckpt")
    torch.save(checkpoint, path)
    line = _one_line_error(capsys, ["test", "--config", recipe, "--ckpt_path", path, "--runs_csv", ""])
    assert line.startswith(f"error: {path}: written by an earlier finegrained (its settings lr, stage1_epochs have "
                           f"moved, e.g. model.lr is now model.optim.lr)"), line
    from finegrained.cli import entry_point

    assert entry_point(["export", "--ckpt", path, "--out", str(tmp_path / "m.onnx")]) == 0


def test_checkpoint_for_another_class_count(trained_run, tmp_path):
    recipe, ckpt, _ = trained_run
    other = make_image_folder(tmp_path / "five", n_classes=5, per_class=3)
    with pytest.raises(ValueError, match="trained for 3 classes but the data has 5.*init_from"):
        main(["test", "--config", recipe, "--ckpt_path", ckpt, "--data.init_args.root", other,
              "--runs_csv", str(tmp_path / "runs.csv")])


def test_unknown_head_or_backbone_lists_the_known_names(trained_run):
    recipe, _, _ = trained_run
    with pytest.raises(ValueError, match="unknown head 'nope'; known heads: .*gmsop.*isqrt"):
        main(["fit", "--config", recipe, "--trainer.fast_dev_run", "true", "--model.head", "nope"])
    with pytest.raises(ValueError, match="unknown backbone 'resnet5'; known backbones: .*resnet50"):
        main(["fit", "--config", recipe, "--trainer.fast_dev_run", "true", "--model.backbone", "resnet5"])


def test_a_mistyped_command_is_one_line_naming_every_command(capsys):
    from finegrained.cli import TOOLS, TRAINING_COMMANDS, entry_point
    assert entry_point(["tabels"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the command line: no command 'tabels' (did you mean tables?); the commands are ")
    assert "\n" not in err and all(name in err for name in list(TRAINING_COMMANDS) + list(TOOLS))


def test_version(capsys):
    import finegrained
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"finegrained {finegrained.__version__}\n"
