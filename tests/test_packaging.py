"""The package as a user installs it: ``python -m build`` makes a wheel and an sdist; the wheel, installed into a
fresh virtual environment, gives a working ``finegrained`` command that fits one step on the demo data.

The fresh environment takes the dependencies from the project's environment (a ``.pth`` file), so that the test
installs nothing from the network; ``finegrained`` itself comes only from the wheel."""
import glob
import os
import subprocess
import sys
import sysconfig

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
    assert glob.glob(str(tmp_path / "dist" / "finegrained-*.tar.gz"))

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
    fit = _run([command, "fit", "--config", os.path.join(REPO_ROOT, "recipes", "demo.yaml"),
                "--trainer.fast_dev_run", "true", "--trainer.default_root_dir", str(tmp_path / "run"),
                "--data.init_args.num_workers", "0"], cwd=elsewhere, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "Running in `fast_dev_run` mode: will run the requested loop using 1 batch(es)" in fit.stdout + fit.stderr
