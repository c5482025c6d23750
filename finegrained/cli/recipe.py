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

import hashlib
import json
import os
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


def config_hash(config: Dict[str, Any]) -> str:
    """A short, key-order-independent hash of a configuration mapping."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


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
