"""A trained network in the Hugging Face Hub format: ``config.json``, ``model.safetensors`` and a model card.

``FineGrainedNetwork.save_pretrained(folder)``, ``FineGrainedNetwork.from_pretrained(folder_or_repo_id)`` and
``push_to_hub(repo_id)`` come from huggingface_hub's ``PyTorchModelHubMixin`` and call :func:`save_network` and
:func:`load_network`; ``finegrained export --format hf`` (:mod:`finegrained.export_hub`) sets the network's
``pretrained_cfg`` from a checkpoint and its run record first. Like the network, this needs no Lightning.

* ``config.json``: the network's ``architecture`` (the constructor arguments that rebuild it: backbone, head and
  its arguments, classes, ...), its ``pretrained_cfg`` (``class_names``, ``preprocessing``, ``test_flip``, and
  from the run record of ``finegrained test``, ``evaluation``) and ``finegrained_version``. Never where the
  weights came from: ``model.safetensors`` holds all of them.
* ``model.safetensors``: the state dict, loaded strictly (every tensor present, none extra) and never by pickle.
* ``README.md``: the model card (:func:`model_card`): the method and its paper, the data, the accuracy from the
  run record and which checkpoint it is, the preprocessing, intended use, licence, how to load it, citation.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

from finegrained.heads import head_display_name, head_paper
from finegrained.json_file import read_json_object
from finegrained.version import __version__

CONFIG_FILE, WEIGHTS_FILE, CARD_FILE = "config.json", "model.safetensors", "README.md"
ARCHITECTURE = ("num_classes", "backbone", "last_stride", "head", "head_kwargs", "dropout", "backbone_layers",
                "channels_last")
PRETRAINED_CFG = ("class_names", "preprocessing", "test_flip", "evaluation")


def hub_config(network) -> Dict[str, Any]:
    """What ``config.json`` holds for ``network``."""
    if network.architecture.get("backbone") is None:
        raise ValueError("this network was built on a backbone module of your own, which config.json cannot name; "
                         "save its state_dict instead, or build it from a registered backbone name")
    return {**network.architecture, **{k: network.pretrained_cfg[k] for k in PRETRAINED_CFG
                                       if k in network.pretrained_cfg},
            "finegrained_version": __version__}


def save_network(network, folder) -> None:
    """Write ``config.json``, ``model.safetensors`` and the model card of ``network`` into ``folder``."""
    from safetensors.torch import save_model

    config = hub_config(network)
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    save_model(network, os.path.join(folder, WEIGHTS_FILE))
    with open(os.path.join(folder, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(folder, CARD_FILE), "w", encoding="utf-8") as f:
        f.write(model_card(config))
    # safetensors writes its file readable by its owner alone; the folder's files get the permissions the umask
    # gives new files, as config.json and README.md have, so that a service account can read what was exported.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(os.path.join(folder, WEIGHTS_FILE), 0o666 & ~umask)


def read_local_config(folder: str) -> Dict[str, Any]:
    """The config.json of a local folder, with one clear error for a folder or file that is not one."""
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: not found; expected a folder written by save_pretrained or finegrained "
                                f"export --format hf")
    return read_json_object(path, "the config.json of a folder written by save_pretrained or finegrained export "
                                  "--format hf")


def _check_tensors(network, weights: str) -> Dict[str, Any]:
    """The tensors of ``weights``, refused unless they are exactly the network's: the same names, shapes and dtypes
    (a float16 file is not silently widened). One line names the first differences."""
    import safetensors.torch

    try:
        tensors = safetensors.torch.load_file(weights, device="cpu")
    except PermissionError as err:
        raise PermissionError(f"{weights}: cannot be read ({err.strerror})") from None
    except (OSError, ValueError, RuntimeError, safetensors.SafetensorError) as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise ValueError(f"{weights}: not a safetensors file ({first})") from None
    expected = network.state_dict()
    problems = [f"missing {k}" for k in expected if k not in tensors]
    problems += [f"unexpected {k}" for k in tensors if k not in expected]
    problems += [f"{k}: {tuple(tensors[k].shape)} {tensors[k].dtype}, expected {tuple(v.shape)} {v.dtype}"
                 for k, v in expected.items() if k in tensors
                 and (tensors[k].shape != v.shape or tensors[k].dtype != v.dtype)]
    if problems:
        raise ValueError(f"{weights}: not the weights of the network config.json describes ({len(problems)} "
                         f"differences: {'; '.join(problems[:3])}{'; ...' if len(problems) > 3 else ''})")
    return tensors


def load_network(cls, model_id: str, config: Optional[Dict[str, Any]], map_location: str = "cpu",
                 **download: Any):
    """The network of a folder (or Hub repository) that :func:`save_network` wrote, in evaluation mode."""
    where = model_id if os.path.isdir(model_id) else f"the Hub repository {model_id}"
    if not isinstance(config, dict):
        raise FileNotFoundError(f"{where}: no config.json; expected a folder written by save_pretrained or "
                                f"finegrained export --format hf")
    missing = [k for k in ("num_classes", "backbone", "head") if k not in config]
    if missing:
        raise ValueError(f"{os.path.join(model_id, CONFIG_FILE)}: no {', '.join(missing)}; expected the config.json "
                         f"of a finegrained network")
    try:
        network = cls(**{k: config[k] for k in ARCHITECTURE if k in config}, backbone_weights=None, init_from=None)
    except TypeError as err:
        raise ValueError(f"{os.path.join(model_id, CONFIG_FILE)}: does not describe a finegrained network ({err})")
    if os.path.isdir(model_id):
        weights = os.path.join(model_id, WEIGHTS_FILE)
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"{weights}: not found; expected the weights beside config.json")
    else:  # the real download path: only the safetensors file is ever fetched (no pickle fallback)
        from huggingface_hub import hf_hub_download

        weights = hf_hub_download(repo_id=model_id, filename=WEIGHTS_FILE, **download)
    network.load_state_dict(_check_tensors(network, weights), strict=True)
    network.pretrained_cfg = {k: config[k] for k in PRETRAINED_CFG if k in config}
    return network.to(map_location).eval()


def model_card(config: Dict[str, Any]) -> str:
    """The README.md of a folder: YAML metadata for the Hub, then what a user needs to trust and use the model."""
    import yaml

    head, backbone = config["head"], config["backbone"]
    method, paper = head_display_name(head), head_paper(head)
    evaluation = config.get("evaluation") or {}
    classes = config.get("class_names") or []
    dataset = evaluation.get("dataset", "")
    metadata: Dict[str, Any] = {"library_name": "finegrained", "license": "mit", "pipeline_tag": "image-classification",
                                "tags": ["finegrained", "fine-grained-classification", "second-order-pooling",
                                         head, backbone.replace("/", "-")]}
    if "top1" in evaluation:
        metrics = [{"type": "accuracy", "name": "top-1", "value": round(float(evaluation["top1"]), 6)}]
        metrics += [{"type": "accuracy", "name": name, "value": round(float(evaluation[key]), 6)}
                    for key, name in (("top5", "top-5"), ("mean_class_acc", "mean per-class"))
                    if evaluation.get(key, "") != ""]
        metadata["model-index"] = [{"name": f"{method} {backbone}", "results": [{
            "task": {"type": "image-classification"}, "dataset": {"name": dataset or "test set", "type": dataset},
            "metrics": metrics}]}]
    lines = ["---", yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True).strip(), "---", "",
             f"# {method} on {backbone}" + (f" ({dataset})" if dataset else ""), "",
             f"An image classifier trained with finegrained {config.get('finegrained_version', '')}: the {backbone} "
             f"backbone, the {method} pooling head and a linear classifier over {config.get('num_classes')} "
             f"classes.", "",
             "## Method", "", f"- Head: `{head}` ({method}), arguments {json.dumps(config.get('head_kwargs') or {})}.",
             f"- Paper: {paper}",
             f"- Backbone: `{backbone}`, last stride {config.get('last_stride')}.", ""]
    lines += ["## Evaluation", ""]
    if "top1" in evaluation:
        named = f"`{os.path.basename(str(evaluation['checkpoint']))}`, " if evaluation.get("checkpoint") else ""
        checkpoint = named + (evaluation.get("selection") or "selection not recorded")
        lines += [f"Recorded by `finegrained test` (run {evaluation.get('run_id', '?')}, "
                  f"{evaluation.get('timestamp', '?')}) on the test split of its data (dataset `{dataset or '?'}`; "
                  f"recipe {evaluation.get('recipe') or 'not recorded'})"
                  + (" with the logits of each image and its horizontal flip averaged" if config.get("test_flip")
                     else "") + ":", "",
                  "| metric | value |", "|---|---|",
                  f"| top-1 accuracy | {float(evaluation['top1']):.4f} |"]
        lines += [f"| {name} | {float(evaluation[key]):.4f} |" for key, name in
                  (("top5", "top-5 accuracy"), ("mean_class_acc", "mean per-class accuracy"))
                  if evaluation.get(key, "") != ""]
        lines += ["", f"Checkpoint: {checkpoint}; validation: {evaluation.get('validation') or 'not recorded'}"
                  + (". With validation on the test set the checkpoint is the last epoch's, never one chosen on the "
                     "test set." if evaluation.get("validation") == "test set" else ".")]
        if evaluation.get("overrides"):
            lines += [f"Changed from the recipe ({evaluation.get('recipe', '')}): {evaluation['overrides']}."]
    else:
        lines += ["No record of `finegrained test` for this checkpoint was found: this card states no accuracy."]
    lines += [""]
    preprocessing = config.get("preprocessing")
    lines += ["## Preprocessing", ""]
    if preprocessing and preprocessing.get("steps"):  # the exact steps (as export manifests give them)
        lines += [f"{k + 1}. {step}" for k, step in enumerate(preprocessing["steps"])]
    elif preprocessing:
        lines += ["```json", json.dumps(preprocessing, indent=2), "```"]
    else:
        lines += ["Not recorded."]
    lines += ["", "## Intended use", "",
              f"Classifying images into the {config.get('num_classes')} classes it was trained on"
              + (f" ({', '.join(map(str, classes[:5]))}{', ...' if len(classes) > 5 else ''})" if classes else "")
              + ". It gives one of these classes for any input: it does not say when an image shows none of them, "
                "and its accuracy holds for images like those of its test set, not for others.", "",
              "## Licence", "",
              "The weights are released under the MIT licence of finegrained; the training images and the "
              "ImageNet-pretrained backbone weights they started from have their own terms, which apply too.", "",
              "## How to load it", "", "```python",
              "from finegrained import FineGrainedNetwork", "",
              'network = FineGrainedNetwork.from_pretrained("THIS_FOLDER_OR_REPO_ID")   # safetensors, strict',
              "logits = network.inference_network()(images)   # images preprocessed as above: (B, 3, H, W)",
              'classes = network.pretrained_cfg.get("class_names")', "```", "",
              "or serve it: `finegrained serve --model THIS_FOLDER`.", "",
              "## Citation", "", f"Cite the method's paper: {paper}", "",
              "and the toolkit that trained it, finegrained (MIT licence; its CITATION.cff gives the entry).", ""]
    return "\n".join(lines)
