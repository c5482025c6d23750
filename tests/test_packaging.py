"""The package as a user installs it: ``python -m build`` makes a wheel and an sdist; the wheel, installed into a
fresh virtual environment, gives a working ``finegrained`` command that fits one step on the demo data.

The fresh environment takes the dependencies from the project's environment (a ``.pth`` file), so that the test
installs nothing from the network; ``finegrained`` itself comes only from the wheel."""
import glob
import os
import subprocess
import sys
import sysconfig
import tarfile

import pytest

from tests.conftest import REPO_ROOT

FASHION_MNIST = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"


def _run(args, **kwargs):
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def test_the_wheel_installs_and_fits_one_step(tmp_path):
    if not os.path.isfile(FASHION_MNIST):
        pytest.skip("the demo data (Debian's dataset-fashion-mnist) is not installed: make setup installs it")
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp_path / "dist"), REPO_ROOT],
         cwd=REPO_ROOT)
    wheel, = glob.glob(str(tmp_path / "dist" / "finegrained-*.whl"))
    sdist, = glob.glob(str(tmp_path / "dist" / "finegrained-*.tar.gz"))
    with tarfile.open(sdist) as archive:  # the sdist holds what the wheel is built from and the tests to check it
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {"LICENSE", "CITATION.cff", "CHANGELOG.md", "results/reference.csv", "recipes/demo.yaml", "mkdocs.yml",
            "tests/conftest.py", "tests/heads/test_heads.py", "docs/index.md"} <= names

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = str(venv / "bin" / "python")
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    with open(os.path.join(site, "project_dependencies.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")  # torch & co.; their .pth files (our editable) stay off
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel])

    elsewhere = str(tmp_path / "elsewhere")  # not the repository: nothing of it is importable from here
    os.makedirs(elsewhere)
    where = _run([python, "-c", "import finegrained, datamodules; print(finegrained.__file__, datamodules.__file__)"],
                 cwd=elsewhere).stdout
    assert where.count(site) == 2, where
    command = str(venv / "bin" / "finegrained")
    assert "launch" in _run([command, "--help"], cwd=elsewhere).stdout
    # the papers' numbers and every recipe travel with the package: tables works, and its help lists the tables
    help_text = _run([command, "tables", "--help"], cwd=elsewhere).stdout
    assert "The published tables (" in help_text and "  finegrained (" in help_text, help_text[-800:]
    shared = os.path.join(str(venv), "share", "finegrained")
    tracked = {os.path.relpath(path, REPO_ROOT) for path in glob.glob(os.path.join(REPO_ROOT, "recipes", "**", "*.yaml"),
                                                                        recursive=True)}
    installed = {os.path.relpath(path, shared) for path in glob.glob(os.path.join(shared, "recipes", "**", "*.yaml"),
                                                                      recursive=True)}
    assert installed == tracked and os.path.isfile(os.path.join(shared, "results", "reference.csv"))
    from finegrained.results.runs import RUN_FIELDS
    (tmp_path / "runs.csv").write_text(",".join(RUN_FIELDS) + "\n")  # no run yet: the published numbers alone
    _run([command, "tables", "--out", str(tmp_path / "tables"), "--runs-csv", str(tmp_path / "runs.csv")],
         cwd=elsewhere)
    assert os.path.isfile(tmp_path / "tables" / "finegrained.md")
    fit = _run([command, "fit", "--config", os.path.join(REPO_ROOT, "recipes", "demo.yaml"),
                "--trainer.fast_dev_run", "true", "--trainer.default_root_dir", str(tmp_path / "run"),
                "--data.init_args.num_workers", "0"], cwd=elsewhere, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "Running in `fast_dev_run` mode: will run the requested loop using 1 batch(es)" in fit.stdout + fit.stderr
