"""FineGrainedClassifier: a :class:`~finegrained.network.FineGrainedNetwork` trained and evaluated by Lightning.

The LightningModule keeps the steps, the loss, the metrics, the optimiser and schedule
(:mod:`finegrained.optim`) and the checkpoint hooks; the network (backbone -> second-order head -> classifier) is
a plain module, and the papers' protocols are callbacks (:mod:`finegrained.callbacks`).

The fine-tuning protocol follows iSQRT-COV (Li, Xie, Wang, Gao, "Towards Faster Training of Global Covariance
Pooling Networks by Iterative Matrix Square Root Normalization", CVPR 2018): SGD with momentum 0.9, separate
learning-rate multipliers for backbone, head and classifier (classifier ×5), and test-time averaging of the
logits of each image and its horizontal flip.

Shapes: images (B, 3, H, W) -> features (B, C, h, w) -> representation (B, head.output_dim)
-> logits (B, num_classes).
"""
from __future__ import annotations

import inspect
import os
from dataclasses import asdict
from typing import Any, Dict, List, Optional, Union

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassConfusionMatrix

from finegrained.callbacks import DataDependentInit, TwoStageFinetuning
from finegrained.checkpoint_file import read_checkpoint_file
from finegrained.losses import loss_function
from finegrained.metrics import accuracy_metrics
from finegrained.network import FineGrainedNetwork, InferenceNetwork
from finegrained.network_weights import CLASSIFIER_PREFIX, NETWORK_PARTS, read_classifier_checkpoint
from finegrained.optim import OptimSettings, configure_optimizers, parameter_groups, zero_through

# A checkpoint holds every weight: rebuilding from it reads neither pretrained weights (a download
# offline) nor the checkpoint a fine-tuning started from (which may be gone).
WEIGHTS_IN_CHECKPOINT = {"backbone_weights": None, "init_from": None}


class FineGrainedClassifier(pl.LightningModule):
    """Args:
        num_classes, backbone, backbone_weights, last_stride, head, head_kwargs, dropout, backbone_layers,
        channels_last, init_from: the network's (:class:`~finegrained.network.FineGrainedNetwork`); a module
            ``backbone`` (Python API) is recorded by its class name, and ``load_from_checkpoint(path,
            backbone=<the same module class, built again>)`` restores it.
        class_names: stored with the checkpoint so exports can name their outputs (linked from the DataModule).
        preprocessing: the test-time preprocessing (stored for exports; linked from the DataModule).
        optim: optimiser and schedule (:class:`~finegrained.optim.OptimSettings`: ``optimizer``, ``lr``,
            ``momentum``, ``lr_mult``, ``weight_decay``, ``weight_decay_mult``, ``scheduler``, ``lr_steps``,
            ``lr_gamma``).
        label_smoothing: of the cross-entropy loss.
        loss: ``"cross_entropy"`` or ``"one_vs_all_hinge"`` (LRBP's SVM loss), see :mod:`finegrained.losses`.
        test_flip: average the logits of each test image and its horizontal flip.
    """

    def __init__(self, num_classes: int, backbone: Union[str, nn.Module] = "resnet50",
                 backbone_weights: Optional[str] = "imagenet", last_stride: int = 2, head: str = "isqrt",
                 head_kwargs: Optional[Dict[str, Any]] = None, dropout: float = 0.0,
                 backbone_layers: Optional[List[str]] = None, channels_last: bool = False,
                 init_from: Optional[str] = None, class_names: Optional[List[str]] = None,
                 preprocessing: Optional[Dict[str, Any]] = None, optim: OptimSettings = OptimSettings(),
                 label_smoothing: float = 0.0, loss: str = "cross_entropy", test_flip: bool = True):
        super().__init__()
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"num_classes={num_classes} but {len(class_names)} class names were given")
        self.optim = OptimSettings.of(optim)
        self.loss_fn = loss_function(loss, label_smoothing)
        if isinstance(backbone, nn.Module):
            # A module is not a hyperparameter (checkpoints stay loadable with weights_only=True): record its class.
            self.save_hyperparameters(ignore=["backbone"])
            self.hparams.backbone = f"module:{type(backbone).__name__}"
            self.hparams.backbone_weights = backbone_weights = None  # the module comes with its own weights
        else:
            self.save_hyperparameters()
        self.hparams.optim = asdict(self.optim)  # plain data: checkpoints load with weights_only=True
        self.network = FineGrainedNetwork(num_classes, backbone, backbone_weights, last_stride, head, head_kwargs,
                                          dropout, backbone_layers, channels_last, init_from)
        self.val_metrics = accuracy_metrics(num_classes, "val_")
        self.test_metrics = accuracy_metrics(num_classes, "test_")
        self.test_confusion = MulticlassConfusionMatrix(num_classes)
        self.backbone_frozen = False

    # The network's parts, as attributes of the classifier too.
    @property
    def backbone(self) -> nn.Module:
        return self.network.backbone

    @property
    def head(self) -> nn.Module:
        return self.network.head

    @property
    def classifier(self) -> nn.Module:
        return self.network.classifier

    @property
    def dropped_from_init(self) -> List[str]:
        return self.network.dropped_from_init

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, hparams_file=None, strict=None,
                             weights_only: Optional[bool] = True, **kwargs):
        """Lightning's ``load_from_checkpoint``, offline and with ``weights_only=True`` by default.

        The checkpoint holds every weight, so the model is built without reading ``backbone_weights``
        or ``init_from`` again; both stay recorded in ``hparams`` as the checkpoint has them.
        """
        overrides = {key: value for key, value in WEIGHTS_IN_CHECKPOINT.items() if key not in kwargs}
        model = super().load_from_checkpoint(checkpoint_path, map_location=map_location, hparams_file=hparams_file,
                                             strict=strict, weights_only=weights_only, **overrides, **kwargs)
        if isinstance(checkpoint_path, (str, os.PathLike)) and overrides:
            recorded = read_checkpoint_file(checkpoint_path, mmap=True)
            _record_weight_sources(model, recorded.get("hyper_parameters", {}), overrides)
        return model

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        # Restored from a checkpoint: keep the weight sources it records (the model may have been
        # built without them, see WEIGHTS_IN_CHECKPOINT), so later checkpoints record them too.
        _record_weight_sources(self, checkpoint.get("hyper_parameters", {}))
        checkpoint["state_dict"] = classifier_state(checkpoint.get("state_dict", {}))
        saved = checkpoint.get("hyper_parameters", {}).get("num_classes")
        if saved is not None and saved != self.hparams.num_classes:
            raise ValueError(f"the checkpoint was trained for {saved} classes but the data has "
                             f"{self.hparams.num_classes}; test it on its own dataset, or fine-tune from it "
                             f"with --model.init_from CKPT (which drops the classifier)")
        # The same count is not the same classes: output k must mean the data's class k.
        saved_names = list(checkpoint.get("hyper_parameters", {}).get("class_names") or [])
        names = list(self.hparams.get("class_names") or [])
        if saved_names and names and saved_names != names:
            k = next(i for i, (a, b) in enumerate(zip(saved_names, names)) if a != b)
            raise ValueError(f"the checkpoint's class {k} is {saved_names[k]!r} but the data's is {names[k]!r}: it "
                             f"was trained on other classes (or another order); test it on its own dataset, or "
                             f"fine-tune from it with --model.init_from CKPT")
        # Then the tensors themselves (the more specific messages above first).
        check_weights_fit(self.state_dict(), checkpoint["state_dict"],
                          self._trainer.ckpt_path if self._trainer is not None else None)

    # -- inference ------------------------------------------------------------------------
    def forward(self, images: Tensor) -> Tensor:
        return self.network(images)

    def inference_network(self) -> InferenceNetwork:
        """The network ``finegrained test`` evaluates, as a plain module (what export writes)."""
        return InferenceNetwork(self.network, self.hparams.test_flip)

    def predict_logits(self, images: Tensor) -> Tensor:
        """Logits, averaged with those of the flipped images when ``test_flip`` is set."""
        return self.inference_network()(images)

    # -- the frozen backbone of the two-stage protocol (finegrained.callbacks.TwoStageFinetuning) ------------
    def freeze_backbone(self, frozen: bool) -> None:
        """Stage 1 of the frozen route: the backbone in evaluation mode (its BatchNorm statistics kept), without
        autograd, at learning rate 0; stage 2 (``False``): trained as the rest."""
        self.backbone_frozen = bool(frozen)
        self.train(self.training)

    def train(self, mode: bool = True):
        # Lightning puts the whole model back in training mode after every validation, mid-epoch ones
        # included: a frozen backbone must keep its BatchNorm statistics.
        super().train(mode)
        if mode and self.backbone_frozen:
            self.network.backbone.eval()
        return self

    def configure_callbacks(self):
        # A head with a data-dependent initialisation gets it in any Trainer; one configured there takes precedence.
        has_one = any(isinstance(c, DataDependentInit) for c in self.trainer.callbacks)
        return [DataDependentInit()] if self.network.head.has_data_init and not has_one else []

    def on_train_epoch_start(self) -> None:
        self.train()

    # -- steps ----------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        images, labels = batch
        network = self.network
        if self.backbone_frozen:
            with torch.no_grad():
                features = network.backbone(network.in_memory_format(images))
            logits = network.forward_head(network.head(features))
            # Several processes need every trainable parameter in the loss (finegrained.optim.zero_through).
            loss = self.loss_fn(logits, labels) + zero_through(network.backbone)
        else:
            logits = network(images)
            loss = self.loss_fn(logits, labels)
        # sync_dist: under DDP the epoch values are over every rank's images, not rank 0's share.
        if network.head.aux_loss is not None:  # e.g. GM-SOP's load-balance loss
            self.log("train_aux_loss", network.head.aux_loss, on_step=True, on_epoch=True, sync_dist=True,
                     batch_size=len(labels))
            loss = loss + network.head.aux_loss
        acc = (logits.argmax(1) == labels).float().mean()
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True, batch_size=len(labels))
        self.log("train_top1", acc, prog_bar=True, on_step=False, on_epoch=True, sync_dist=True, batch_size=len(labels))
        return loss

    def _evaluate(self, batch, metrics: MetricCollection, stage: str):
        images, labels = batch
        logits = self.predict_logits(images).float()
        loss = F.cross_entropy(logits, labels)
        metrics.update(logits, labels)
        self.log(f"{stage}_loss", loss, prog_bar=stage == "val", sync_dist=True, batch_size=len(labels))
        self.log_dict(metrics, prog_bar=stage == "val", on_step=False, on_epoch=True)
        return logits

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, self.val_metrics, "val")

    def test_step(self, batch, batch_idx):
        logits = self._evaluate(batch, self.test_metrics, "test")
        self.test_confusion.update(logits, batch[1])

    def on_test_epoch_start(self) -> None:
        self.test_confusion.reset()

    def on_test_epoch_end(self) -> None:
        # The images actually evaluated, summed over ranks (a padding sampler would count one twice):
        # what `finegrained test` reports, rather than the dataset's length.
        self.tested_images = int(self.test_confusion.compute().sum())

    def predict_step(self, batch, batch_idx):
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self.predict_logits(images).softmax(dim=1)

    # -- optimisation (finegrained.optim) ------------------------------------------------
    def parts(self) -> Dict[str, nn.Module]:
        return {"backbone": self.network.backbone, "head": self.network.head, "classifier": self.network.classifier}

    def parameter_groups(self) -> List[Dict[str, Any]]:
        """One group per part (and per prefix of the head's ``parameter_lr_mult``), each with its own learning
        rate and weight decay (frozen parameters left out)."""
        o = self.optim
        return parameter_groups(self.parts(), o.lr, o.part_lr_mult, o.weight_decay, o.weight_decay_mult,
                                {"head": self.network.head.parameter_lr_mult})

    def configure_optimizers(self):
        stage1 = next((c for c in self.trainer.callbacks if isinstance(c, TwoStageFinetuning)), None)
        return configure_optimizers(self.parts(), self.optim, self.trainer.max_epochs,
                                    {"head": self.network.head.parameter_lr_mult}, stage1)


def classifier_state(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """A classifier checkpoint's state dict with the network's keys under ``network.`` (a checkpoint written before
    the network was its own module has them at the top level)."""
    if any(key.startswith(CLASSIFIER_PREFIX) for key in state):
        return state
    return {(CLASSIFIER_PREFIX + key if key.startswith(NETWORK_PARTS) else key): value for key, value in state.items()}


def load_classifier(checkpoint_path: str, map_location: str = "cpu") -> FineGrainedClassifier:
    """Rebuild a trained classifier from a Lightning checkpoint, reading it with ``weights_only=True``.

    The backbone is built without pretrained weights (the checkpoint holds all of them), so
    this works offline for any backbone.
    """
    return classifier_from_checkpoint(read_classifier_checkpoint(checkpoint_path, map_location), checkpoint_path)


def classifier_from_checkpoint(checkpoint: Dict[str, Any], source: Optional[str] = None) -> FineGrainedClassifier:
    """:func:`load_classifier` for a checkpoint already read (``{"hyper_parameters", "state_dict", ...}``)."""
    accepted = inspect.signature(FineGrainedClassifier.__init__).parameters
    recorded = checkpoint["hyper_parameters"]
    # LightningCLI adds bookkeeping entries such as "_instantiator"; keep constructor arguments only, and the
    # optimiser settings of a checkpoint written before they were grouped under optim.
    hparams = {k: v for k, v in recorded.items() if k in accepted}
    hparams.setdefault("optim", {k: v for k, v in recorded.items() if k in OptimSettings.__dataclass_fields__})
    model = FineGrainedClassifier(**{**hparams, **WEIGHTS_IN_CHECKPOINT})
    state = classifier_state(checkpoint["state_dict"])
    check_weights_fit(model.state_dict(), state, source)
    model.load_state_dict(state)
    _record_weight_sources(model, checkpoint["hyper_parameters"])
    return model.eval()


def check_weights_fit(own: Dict[str, Any], saved: Dict[str, Any], source: Optional[str] = None) -> None:
    """ValueError in one line when a checkpoint's tensors are not this model's (names or shapes): written for
    another head or by a version of finegrained whose layers differ (a bias more or less)."""
    unexpected = sorted(set(saved) - set(own))
    missing = sorted(set(own) - set(saved))
    reshaped = sorted(k for k in set(own) & set(saved)
                      if hasattr(saved[k], "shape") and tuple(saved[k].shape) != tuple(own[k].shape))
    if not (unexpected or missing or reshaped):
        return

    def some(keys):
        return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")

    problems = [f"{what} {some(keys)}" for what, keys in (("unexpected", unexpected), ("missing", missing),
                                                          ("other shapes", reshaped)) if keys]
    raise ValueError(f"{source + ': ' if source else ''}the checkpoint's weights do not fit this model ({'; '.join(problems)}): it was written for "
                     f"another head or by a finegrained whose layers differ; fine-tune from it with --model.init_from "
                     f"CKPT, which keeps the tensors that fit")


def _record_weight_sources(model: FineGrainedClassifier, recorded: Dict[str, Any], keys=WEIGHTS_IN_CHECKPOINT) -> None:
    """Put back the weight sources the checkpoint recorded (not used to build it, kept for the record)."""
    for key in keys:
        model.hparams[key] = recorded.get(key)
