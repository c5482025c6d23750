"""The environment is the one the tests passed with: every package of constraints.txt that is installed has its
locked version, and the ranges of setup.cfg admit every locked version (so the lock is installable)."""
import configparser
import os
from importlib.metadata import PackageNotFoundError, version

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = os.path.join(os.path.dirname(__file__), "..")


def locked():
    pins = {}
    with open(os.path.join(ROOT, "constraints.txt")) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                name, _, pinned = line.partition("==")
                assert pinned, f"constraints.txt: {line!r} is not an exact pin"
                pins[canonicalize_name(name)] = pinned
    return pins


def test_installed_versions_are_the_locked_ones():
    drift = []
    for name, pinned in locked().items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            continue  # a platform-specific dependency of another platform
        if installed != pinned:
            drift.append(f"{name} {installed} (locked {pinned})")
    assert not drift, "installed versions differ from constraints.txt (run make setup): " + ", ".join(drift)


def test_the_ranges_of_setup_cfg_admit_the_lock():
    config = configparser.ConfigParser()
    config.read(os.path.join(ROOT, "setup.cfg"))
    requirements = [Requirement(line) for line in config["options"]["install_requires"].splitlines() if line.strip()]
    requirements += [Requirement(line) for line in config["options.extras_require"]["dev"].splitlines() if line.strip()]
    pins = locked()
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is required but not locked in constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), \
            f"setup.cfg requires {requirement}, constraints.txt locks {pins[name]}"


def test_the_libraries_whose_behaviour_the_project_relies_on_have_an_upper_bound():
    config = configparser.ConfigParser()
    config.read(os.path.join(ROOT, "setup.cfg"))
    bounded = {canonicalize_name(Requirement(line).name) for line in config["options"]["install_requires"].splitlines()
               if line.strip() and any(s.operator in ("<", "<=", "==", "~=") for s in Requirement(line).specifier)}
    assert {"pytorch-lightning", "torchmetrics", "timm", "jsonargparse"} <= bounded
