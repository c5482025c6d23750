"""Recipes: LightningCLI YAML files that may inherit shared settings from base files.

A recipe lists its bases under ``base:`` (paths relative to the recipe, applied in order, each
of which may have bases of its own); its own keys come last and win. Merging is recursive for
mappings and replaces everything else, as LightningCLI does with several ``--config`` files::

    # recipes/cub/isqrt_resnet50.yaml
    base: [../_base/data/cub.yaml, ../_base/protocol/isqrt_resnet.yaml]
    model:
      head: isqrt

:func:`load_recipe` returns the merged mapping; :func:`expand_config_args` rewrites
``--config RECIPE`` in a command line into the merged YAML text that LightningCLI reads.
"""
from __future__ import annotations

import os
import re
from typing import Any, Dict, List, Optional

import yaml

BASE_KEY = "base"


def deep_merge(base: Dict[str, Any], override: Dict[str, Any]) -> Dict[str, Any]:
    """A new mapping: ``override`` on top of ``base``, recursing into nested mappings."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_recipe(path: str, _chain: Optional[List[str]] = None) -> Dict[str, Any]:
    """The recipe at ``path`` merged over its bases (recursively)."""
    path = os.path.abspath(path)
    chain = (_chain or []) + [path]
    if path in (_chain or []):
        raise ValueError("recipe bases form a cycle: " + " -> ".join(chain))
    try:
        with open(path) as f:
            recipe = yaml.safe_load(f) or {}
    except FileNotFoundError:
        where = f" (a base of {chain[-2]})" if len(chain) > 1 else ""
        raise FileNotFoundError(f"recipe not found: {path}{where}") from None
    if not isinstance(recipe, dict):
        raise ValueError(f"{path}: a recipe must be a YAML mapping, got {type(recipe).__name__}")
    bases = recipe.pop(BASE_KEY, []) or []
    if isinstance(bases, str):
        bases = [bases]
    merged: Dict[str, Any] = {}
    for base in bases:
        merged = deep_merge(merged, load_recipe(os.path.join(os.path.dirname(path), base), chain))
    return deep_merge(merged, recipe)


def recipe_text(path: str) -> str:
    """The merged recipe as YAML text."""
    return yaml.safe_dump(load_recipe(path), sort_keys=False)


def expand_config_args(argv: List[str]) -> List[str]:
    """Replace each ``--config FILE`` whose file uses ``base:`` by the merged YAML text."""
    out: List[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        value = None
        if arg == "--config" and i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
        elif arg.startswith("--config="):
            value, i = arg.split("=", 1)[1], i + 1
        else:
            out.append(arg)
            i += 1
            continue
        if os.path.isfile(value) and _has_bases(value):
            value = recipe_text(value)
        out += ["--config", value]
    return out


def _has_bases(path: str) -> bool:
    with open(path) as f:
        recipe = yaml.safe_load(f)
    return isinstance(recipe, dict) and BASE_KEY in recipe


# What a run changed from its recipe. Settings that say where the data and the outputs are, how the run is executed,
# logged or repeated (the seed) do not change what is trained or evaluated: a run that changes only them follows
# its recipe. Everything else that differs from the recipe is an override, recorded with the run and marked in the
# tables.
OUTSIDE_THE_PROTOCOL = (
    "seed_everything", "runs_csv", "ckpt_path", "config", "select_on_test", "svm", "weights_only",
    "data.init_args.root", "data.init_args.image_root", "data.init_args.train_csv", "data.init_args.val_csv",
    "data.init_args.test_csv", "data.init_args.data_dir", "data.init_args.path", "data.init_args.num_workers",
    "data.init_args.download", "data.init_args.cache_dir",
    "trainer.default_root_dir", "trainer.logger", "trainer.enable_progress_bar", "trainer.enable_model_summary",
    "trainer.enable_checkpointing", "trainer.log_every_n_steps", "trainer.accelerator", "trainer.strategy",
    "trainer.deterministic", "trainer.benchmark", "trainer.profiler", "trainer.plugins", "trainer.detect_anomaly",
    "trainer.barebones", "trainer.num_sanity_val_steps",
    "checkpoint", "run_artifacts", "random_state",
)
# At test time only what changes the evaluation counts: the data's evaluation settings, the flip averaging and the
# test batches; the model is the checkpoint's, whatever the recipe's training settings say.
EVALUATION_SETTINGS = ("data", "model.test_flip", "trainer.limit_test_batches", "trainer.precision",
                       "trainer.fast_dev_run")
TRAINING_ONLY_DATA = ("data.init_args.batch_size", "data.init_args.hflip", "data.init_args.train_crop",
                      "data.init_args.val_fraction", "data.init_args.shuffle_block")


# The project's recipes (one per published row and dataset, and the demo): a recipe that inherits from one of them
# through base: is compared with it, so that a user's file cannot make a shortened run look like the protocol.
PROJECT_RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "recipes")


def is_project_recipe(path: str) -> bool:
    folder = os.path.realpath(PROJECT_RECIPES)
    relative = os.path.relpath(os.path.realpath(path), folder)
    return not relative.startswith("..") and "_base" not in relative.split(os.sep)


def reference_recipe(path: str, _seen: Optional[List[str]] = None) -> str:
    """The recipe a run of ``path`` is compared with: ``path`` itself, or the project recipe it derives from (the
    nearest one up its ``base:`` chain, the last base first, as the last base wins)."""
    if is_project_recipe(path):
        return path
    seen = (_seen or []) + [os.path.realpath(path)]
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError):
        return path
    bases = raw.get(BASE_KEY, []) if isinstance(raw, dict) else []
    for base in reversed([bases] if isinstance(bases, str) else bases or []):
        base_path = os.path.join(os.path.dirname(os.path.abspath(path)), base)
        if os.path.realpath(base_path) in seen or not os.path.isfile(base_path):
            continue
        found = reference_recipe(base_path, seen)
        if is_project_recipe(found):
            return found
    return path


def _under(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def flatten(config: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists and other values are leaves)."""
    flat: Dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def recipe_overrides(run: Dict[str, Any], recipe: Dict[str, Any], stage: str = "fit") -> Dict[str, Any]:
    """The settings of ``run`` that differ from ``recipe`` (both parsed configurations of one subcommand) and change
    what ``stage`` (``fit`` or ``test``) computes: ``{dotted key: the run's value}``, sorted."""
    run_flat, recipe_flat = flatten(run), flatten(recipe)
    changed = {}
    for key in sorted(set(run_flat) | set(recipe_flat)):
        if _under(key, OUTSIDE_THE_PROTOCOL) or key.startswith("__"):
            continue
        if stage != "fit" and (not _under(key, EVALUATION_SETTINGS) or _under(key, TRAINING_ONLY_DATA)):
            continue
        if run_flat.get(key) != recipe_flat.get(key):
            changed[key] = run_flat.get(key)
    return changed


class RecipeError(ValueError):
    """A recipe (or command line) setting the parser refused, described in one line."""


def file_setting(key: str, path: str) -> Optional[str]:
    """The recipe file, among ``path`` and its bases, whose value of the dotted ``key`` the merged recipe keeps."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(raw, dict):
        return None
    found = None
    bases = raw.pop(BASE_KEY, []) or []
    for base in [bases] if isinstance(bases, str) else bases:
        found = file_setting(key, os.path.join(os.path.dirname(os.path.abspath(path)), base)) or found
    flat = flatten(raw)
    if key in flat or any(k.startswith(key + ".") for k in flat):
        found = path
    return found


def where_set(key: str, argv: List[str]) -> str:
    """``the command line``, the recipe file that sets ``key``, or the recipes named with ``--config``."""
    if any(a == f"--{key}" or a.startswith(f"--{key}=") for a in argv):
        return "the command line"
    recipes = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    recipes += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for path in reversed(recipes):  # the last recipe wins
        found = file_setting(key, path) if os.path.isfile(path) else None
        if found:
            return os.path.relpath(found) if not os.path.relpath(found).startswith("..") else found
    return ", ".join(recipes) or "the command line"


# Settings that moved: the optimiser's into model.optim, the protocols' into their callbacks (finegrained.callbacks).
MOVED = {**{f"model.{name}": f"model.optim.{name}" for name in (
    "optimizer", "lr", "momentum", "lr_mult", "weight_decay", "weight_decay_mult", "scheduler", "lr_steps", "lr_gamma")},
    **{f"model.stage1_{name}": f"stage1.{name}" for name in (
        "epochs", "route", "lr", "weight_decay", "batch_size", "lr_steps", "lr_gamma", "init_std", "init_bias")},
    "model.data_init_images": "data_init.images", "model.data_init_seed": "data_init.seed",
    "model.clip_activation_grad": "clip_activation_grad.bound"}


def _close_settings(key: str) -> List[str]:
    """Where a moved setting went, or settings of the model or trainer whose names are close to ``key``'s last part."""
    import difflib
    import inspect

    if key in MOVED:
        return [MOVED[key]]
    section, _, name = key.rpartition(".")
    if section == "model":
        from finegrained.model import FineGrainedClassifier as owner
    elif section == "trainer":
        from pytorch_lightning import Trainer as owner
    else:
        return []
    names = [p for p in inspect.signature(owner.__init__).parameters if p != "self"]
    moved = [old.split(".", 1)[1] for old in MOVED if old.startswith(section + ".")]
    close = difflib.get_close_matches(name, names + moved, n=2, cutoff=0.7)
    return [MOVED.get(f"{section}.{n}", f"{section}.{n}") for n in close]


def describe_config_error(message: str, argv: List[str]) -> str:
    """jsonargparse's multi-line parse error as ``<file>: <key>: <what was expected>`` on one line."""
    text = " ".join(message.split())
    match = re.match(r"Subcommand '(\w+)' does not accept option '([\w.]+)'|unrecognized arguments: --([\w.]+)", text)
    if match:  # a key the parser does not know, named in a recipe or (unrecognized) on the command line
        command, key = match.group(1), match.group(2) or match.group(3)
        command = command or next((a for a in argv if not a.startswith("-")), "fit")
        close = _close_settings(key)
        hint = f" (did you mean {' or '.join(close)}?)" if close else f" (see finegrained {command} --help)"
        where = where_set(key, argv) if match.group(2) else "the command line"
        return f"{where}: {key} is not a setting of finegrained {command}{hint}"
    match = re.match(r"Parser key \"config\": File does not exist: '(.*)'", text)
    if match:
        return f"{match.group(1)}: recipe not found"
    match = re.match(r'Parser key "config": (.*)', text)
    if match:
        return f"recipe: {match.group(1)}"
    # A class's own check of its arguments failed when the recipe's data (or model) was built from them.
    match = re.match(r"Does not validate against any of the Union subtypes .*? Errors: - (.*?) - Expected a "
                     r"<class 'NoneType'>.*?Namespace\(class_path='([\w.]+)'", text)
    if match:
        detail, cls = match.groups()
        setting = re.search(r"^(\w+) ", detail)
        key = f"data.init_args.{setting.group(1)}" if setting else "data"
        return f"{where_set(key, argv)}: {cls}: {detail}"
    match = re.match(r"the following arguments are required: \w+\.(.*)", text)
    if match:
        return (f"{where_set(match.group(1), argv)}: no {match.group(1)}: setting; expected e.g. data: {{class_path: "
                f"datamodules.ImageFolderDataModule, init_args: {{root: ...}}}}")
    match = re.match(r'Parser key "([\w.]+)": (.*)', text)
    if not match:
        return text
    key, detail = match.groups()
    option = re.search(r"Problem with given class_path '([\w.]+)': Option '(\w+)' is not accepted", detail)
    if option:
        cls, name = option.groups()
        full = f"{key}.init_args.{name}"
        return f"{where_set(full, argv)}: {full} is not an argument of {cls}"
    missing = re.search(r"Problem with given class_path '([\w.]+)': (module .*? has no attribute '\w+'|.*?"
                        r"(?:not found|does not exist|No module named [^ ]+))", detail)
    if missing:
        return f"{where_set(key + '.class_path', argv)}: {key}.class_path: {missing.group(1)} cannot be imported " \
               f"({missing.group(2)})"
    nested = re.search(r"Problem with given class_path '[\w.]+': Parser key \"([\w.]+)\": (.*?)(?: - Expected a|$)",
                       detail)
    if nested:
        key, detail = f"{key}.init_args.{nested.group(1)}", nested.group(2)
    expected = re.findall(r"Expected a <class '(\w+)'>", detail)
    given = re.search(r"(?:Given value|Got value): (.*?)(?: Given value type|$)", detail)
    if expected:
        what = " or ".join(dict.fromkeys("null" if e == "NoneType" else e for e in expected))
        return f"{where_set(key, argv)}: {key}: expected {what}, got {given.group(1).strip() if given else '?'}"
    return f"{where_set(key, argv)}: {key}: {detail}"
