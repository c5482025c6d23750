"""The layout's rules (what may import what), the head contract and the two registries."""
import ast
import glob
import importlib
import os
import re
import sys

import pytest
import torch

import finegrained
from finegrained.backbones import available_backbones, build_backbone, register_backbone
from finegrained.heads import PoolingHead, available_heads, build_head, head_display_name, register_head
from tests.conftest import small_head

ROOT = os.path.join(os.path.dirname(__file__), "..")
LIBRARY = ("finegrained.ops", "finegrained.heads", "finegrained.backbones", "finegrained.optim", "finegrained.model",
           "finegrained.network", "finegrained.network_weights", "finegrained.features", "finegrained.checkpoint_file",
           "finegrained.data_contract", "finegrained.callbacks", "finegrained.pretrained", "finegrained.losses",
           "finegrained.metrics", "finegrained.svm", "finegrained.export", "finegrained.predict", "finegrained.resume",
           "finegrained.network_hub", "finegrained.export_hub", "finegrained.version", "finegrained.json_file")
# The network and everything it needs work in any PyTorch training loop: no Lightning, no torchmetrics.
WITHOUT_LIGHTNING = ("finegrained.ops", "finegrained.heads", "finegrained.backbones", "finegrained.network",
                     "finegrained.network_hub", "finegrained.version", "finegrained.json_file",
                     "finegrained.network_weights", "finegrained.features", "finegrained.checkpoint_file",
                     "finegrained.pretrained", "finegrained.optim", "finegrained.data_contract", "finegrained.svm")
TOOLING = ("finegrained.bench", "finegrained.results", "finegrained.cli", "finegrained.launch", "finegrained.serve")


def _module_name(path):
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _imports(path):
    """Every module that ``path`` imports, at module level or inside functions, absolute names."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    package = _module_name(path) if path.endswith("__init__.py") else _module_name(path).rpartition(".")[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _within(name, prefixes):
    return any(name == p or name.startswith(p + ".") for p in prefixes)


MODULES = {_module_name(p): _imports(p) for p in glob.glob(os.path.join(ROOT, "finegrained", "**", "*.py"),
                                                            recursive=True)
           + glob.glob(os.path.join(ROOT, "datamodules", "*.py"))}


def _project_imports(module):
    return {n for n in MODULES[module] if n.split(".")[0] in ("finegrained", "datamodules")}


def _modules_in(prefix):
    found = [m for m in MODULES if _within(m, (prefix,))]
    assert found, f"no modules under {prefix}"
    return found


# ---- what may import what (docstring of finegrained/__init__.py) ---------------------------------------
@pytest.mark.parametrize("package, allowed", [
    ("finegrained.ops", ("finegrained.ops",)),
    ("finegrained.heads", ("finegrained.heads", "finegrained.ops")),
    ("finegrained.backbones", ("finegrained.backbones", "finegrained.checkpoint_file")),  # weight files read safely
    ("finegrained.optim", ()),
    ("finegrained.model", ("finegrained.model", "finegrained.network", "finegrained.network_weights",
                           "finegrained.callbacks", "finegrained.checkpoint_file", "finegrained.optim",
                           "finegrained.losses", "finegrained.metrics")),
    ("finegrained.network", ("finegrained.network", "finegrained.network_weights", "finegrained.heads",
                             "finegrained.backbones", "finegrained.network_hub")),
    ("finegrained.network_hub", ("finegrained.heads", "finegrained.version", "finegrained.json_file")),
    ("finegrained.export_hub", ("finegrained.network", "finegrained.network_hub", "finegrained.model",
                                "finegrained.export", "datamodules.transforms")),
    ("finegrained.network_weights", ("finegrained.backbones", "finegrained.checkpoint_file", "finegrained.pretrained")),
    ("finegrained.callbacks", ("finegrained.callbacks", "finegrained.features", "finegrained.optim",
                               "finegrained.data_contract", "finegrained.svm")),
    ("finegrained.features", ("finegrained.network",)),
    ("finegrained.checkpoint_file", ()),
    ("finegrained.data_contract", ()),
    ("finegrained.svm", ("finegrained.features",)),
    ("finegrained.pretrained", ()),
    ("finegrained.metrics", ()),
    ("finegrained.resume", ("finegrained.checkpoint_file",)),
    ("finegrained.losses", ()),
    ("datamodules", ("datamodules",)),
])
def test_layer_imports_only_what_it_may(package, allowed):
    for module in _modules_in(package):
        bad = {n for n in _project_imports(module) if not _within(n, allowed)}
        assert not bad, f"{module} imports {sorted(bad)}; it may import only {allowed}"


def test_library_never_imports_tooling():
    for module in MODULES:
        if _within(module, LIBRARY):
            bad = {n for n in _project_imports(module) if _within(n, TOOLING)}
            assert not bad, f"library module {module} imports tooling {sorted(bad)}"


def test_the_network_needs_neither_lightning_nor_data():
    for module in [m for package in WITHOUT_LIGHTNING for m in _modules_in(package)]:
        bad = {n for n in MODULES[module]
               if n.split(".")[0] in ("pytorch_lightning", "lightning", "lightning_fabric", "torchmetrics", "datamodules")}
        assert not bad, f"{module} imports {sorted(bad)}: the network must work in any PyTorch training loop"


def test_ops_import_nothing_but_torch_and_the_standard_library():
    for module in _modules_in("finegrained.ops"):
        third_party = {n.split(".")[0] for n in MODULES[module]} - {"finegrained", "torch"} - sys.stdlib_module_names
        assert not third_party, f"{module} imports {sorted(third_party)}"


def test_every_module_has_a_docstring():
    for path in glob.glob(os.path.join(ROOT, "finegrained", "**", "*.py"), recursive=True):
        docstring = ast.get_docstring(ast.parse(open(path, encoding="utf-8").read()))
        assert docstring and len(docstring) > 20, f"{os.path.relpath(path, ROOT)} has no module docstring"


def test_the_layer_rule_can_fail():
    """The checker sees function-level and relative imports (a rule that cannot fail proves nothing)."""
    source = os.path.join(ROOT, "finegrained", "heads", "gap.py")
    assert "finegrained.heads.register_head" in _imports(source)
    assert any(n.startswith("datamodules") for n in MODULES["finegrained.bench.table"])  # a function-level import


# ---- the head contract ------------------------------------------------------------------------------------
def _small(name, channels=8):
    return small_head(name, channels)


@pytest.mark.parametrize("name", available_heads())
def test_every_head_follows_the_contract(name):
    head = _small(name)
    assert isinstance(head, PoolingHead)
    assert isinstance(head.output_dim, int) and head.output_dim > 0
    out = head.eval()(torch.randn(2, 8, 5, 5).relu())
    assert out.shape == (2, head.output_dim)
    assert head.aux_loss is None  # only a training forward may set it
    assert head_display_name(name) and head_display_name(name) != "" and not head.use_substitute


def test_contract_flags_are_the_documented_ones():
    heads = {name: _small(name) for name in available_heads()}
    assert {n for n, h in heads.items() if h.produces_logits} == {"lrbp"}
    assert {n for n, h in heads.items() if h.has_data_init} == {"netvlad", "lrbp"}
    assert {n for n, h in heads.items() if h.export_substitute() is not None} == {"mpncov", "o2p", "g2de", "mpa"}
    assert {n for n, h in heads.items() if h.uses_class_token} == {"sot"}
    assert {n for n, h in heads.items() if h.classifier_init_std is not None} == {"sot"}
    assert head_display_name("g2de") == "G²DeNet" and head_display_name("isqrt") == "iSQRT-COV"


@pytest.mark.parametrize("name", ["netvlad", "lrbp"])
def test_data_init_changes_the_head_and_says_what_it_did(name):
    head = _small(name)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    line = head.init_from_features(torch.randn(3, 8, 4, 4).relu(), seed=0)
    assert name in line and "48" in line  # 3 images × 16 positions
    changed = [k for k, v in head.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, f"{name}: init_from_features changed nothing"


def test_heads_without_data_init_refuse_it():
    with pytest.raises(NotImplementedError, match="no data-dependent initialisation"):
        _small("gap").init_from_features(torch.randn(1, 8, 2, 2))


def test_registry_refuses_heads_outside_the_contract():
    with pytest.raises(TypeError, match="head contract"):
        register_head("plain_module")(torch.nn.Identity)
    with pytest.raises(ValueError, match="registered twice"):
        register_head("gap")(type("Other", (PoolingHead,), {}))
    assert "plain_module" not in available_heads()
    with pytest.raises(ValueError, match="known heads"):
        head_display_name("no_such_head")


def test_display_names_come_from_the_registry():
    from finegrained.results.tables import METHOD_NAMES

    for name in available_heads():
        assert METHOD_NAMES[name] == head_display_name(name)


# ---- the backbone registry --------------------------------------------------------------------------------
def test_backbone_registry_takes_a_new_family():
    from finegrained.backbones import Backbone, _REGISTRY

    @register_backbone("tiny_test_net")
    def tiny(name, weights, last_stride):
        return Backbone(torch.nn.Conv2d(3, 4, 3, stride=last_stride), 4, name)

    try:
        assert "tiny_test_net" in available_backbones()
        assert build_backbone("tiny_test_net", last_stride=1)(torch.randn(1, 3, 8, 8)).shape == (1, 4, 6, 6)
        with pytest.raises(ValueError, match="registered twice"):
            register_backbone("tiny_test_net")(tiny)
    finally:
        _REGISTRY.pop("tiny_test_net", None)


# ---- one version -----------------------------------------------------------------------------------------
def test_the_version_is_set_in_one_place():
    """setup.cfg takes the package's ``__version__``; the ``finegrained.linalg`` re-export of 0.1.0 is gone."""
    import configparser

    import finegrained

    config = configparser.ConfigParser()
    config.read(os.path.join(ROOT, "setup.cfg"))
    assert config["metadata"]["version"] == "attr: finegrained.version.__version__"
    assert re.fullmatch(r"\d+\.\d+\.\d+", finegrained.__version__)
    assert importlib.util.find_spec("finegrained.linalg") is None

def test_the_licence_and_the_citation_file_agree_with_setup_cfg():
    import configparser

    import yaml

    config = configparser.ConfigParser()
    config.read(os.path.join(ROOT, "setup.cfg"))
    licence = config["metadata"]["license"]
    assert open(os.path.join(ROOT, "LICENSE")).readline().strip() == f"{licence} License"
    citation = yaml.safe_load(open(os.path.join(ROOT, "CITATION.cff")))
    assert citation["cff-version"] == "1.2.0" and citation["license"] == licence
    assert citation["title"].startswith(config["metadata"]["name"]) and citation["authors"]
    assert citation["version"] == finegrained.__version__  # the version defined once, cited as it is
    assert all(reference["title"] and reference["authors"] and reference["year"]
               for reference in citation["references"])
