"""Checkpoints are read safely: no library or datamodules module calls torch.load without weights_only=True."""
import glob
import os
import re

from tests.conftest import REPO_ROOT as ROOT


def test_no_torch_load_without_weights_only():
    offenders = []
    for path in glob.glob(os.path.join(ROOT, "finegrained", "**", "*.py"), recursive=True) + \
            glob.glob(os.path.join(ROOT, "datamodules", "*.py")):
        text = open(path).read()
        for match in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in match.group(1):
                offenders.append(f"{os.path.relpath(path, ROOT)}: {match.group(0)}")
    assert not offenders, offenders
