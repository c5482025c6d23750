"""FineGrainedClassifier: backbone -> second-order head -> linear classifier, as a LightningModule.

A head with ``produces_logits`` (low-rank bilinear pooling) is its own classifier; a head that
sets ``aux_loss`` in training (GM-SOP's load balance) has it added to the loss.

The fine-tuning protocol follows iSQRT-COV (Li et al., CVPR 2018): SGD with momentum 0.9,
separate learning-rate multipliers for backbone, head and classifier (classifier ×5),
and test-time averaging of the logits of each image and its horizontal flip.

Shapes: images (B, 3, H, W) -> features (B, C, h, w) -> representation (B, head.output_dim)
-> logits (B, num_classes).
"""
from __future__ import annotations

import inspect
import os
import time
from typing import Any, Dict, List, Optional, Tuple, Union

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_info
from pytorch_lightning.utilities.seed import isolate_rng
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassConfusionMatrix

from finegrained.backbones import build_backbone
from finegrained.backbones.weights import read_state_dict
from finegrained.heads import PoolingHead, build_head
from finegrained.losses import loss_function
from finegrained.metrics import accuracy_metrics
from finegrained.optim import (DEFAULT_LR_MULT, backbone_frozen, check_settings, clip_activation_gradients,
                               configure_optimizers, forget_state, parameter_groups, stage_weight_decay,
                               train_on_cached_features, zero_through)
from finegrained.pretrained import SplitCheckpoint, split_authors_checkpoint
from finegrained.resume import read_checkpoint_file


class InferenceNetwork(nn.Module):
    """images (B, 3, h, w) -> logits (B, K) as evaluated: with ``test_flip``, the mean of the logits of each
    image and its horizontal flip (the iSQRT-COV test protocol). Plain modules only, so it exports."""

    def __init__(self, backbone: nn.Module, head: nn.Module, classifier: nn.Module, test_flip: bool):
        super().__init__()
        self.backbone, self.head, self.classifier, self.test_flip = backbone, head, classifier, bool(test_flip)

    def views(self, images: Tensor) -> List[Tensor]:
        """The inputs whose logits are averaged: the images, and their flip with ``test_flip``."""
        return [images, torch.flip(images, dims=[3])] if self.test_flip else [images]

    @staticmethod
    def average(logits: List[Tensor]) -> Tensor:
        return torch.stack(logits).mean(dim=0)

    def forward(self, images: Tensor) -> Tensor:
        return self.average([self.classifier(self.head(self.backbone(view))) for view in self.views(images)])


def init_head_from_data(head: PoolingHead, features: Tensor, seed: int = 0) -> str:
    """Run ``head``'s data-dependent initialisation on ``features`` (B, C, H, W), timed and logged once.

    The one path for the LightningModule and ``finegrained bench-table``.
    """
    started = time.perf_counter()
    what = head.init_from_features(features, seed=seed)
    message = f"data-dependent initialisation: {what} from {len(features)} images ({time.perf_counter() - started:.1f} s)"
    rank_zero_info(message)
    return message


# A checkpoint holds every weight: rebuilding from it reads neither pretrained weights (a download
# offline) nor the checkpoint a fine-tuning started from (which may be gone).
WEIGHTS_IN_CHECKPOINT = {"backbone_weights": None, "init_from": None}


class FineGrainedClassifier(pl.LightningModule):
    """Args:
        num_classes: number of classes (linked from the DataModule by the CLI).
        backbone: a name from :func:`finegrained.backbones.available_backbones`, ``"timm/<model name>"`` for any
            timm model (ConvNeXt, ViT, Swin, EVA, ...), or (Python API) an ``nn.Module`` mapping images to
            (B, C, h, w) with an integer ``out_channels``.
        backbone_weights: ``None``, ``"imagenet"`` or a path to a state dict (timm backbones: also a timm
            pretrained tag, and ``.safetensors`` files): of the full backbone network, or
            one of the authors' ImageNet-trained second-order models (:mod:`finegrained.pretrained`, e.g.
            fast-MPN-COV's ``mpncovresnet50-15991845.pth``), whose trunk goes into the backbone and whose
            1×1 reduction and BatchNorm go into the head; what was mapped is logged.
        last_stride: 1 removes the backbone's last down-sampling.
        head: a name from :func:`finegrained.heads.available_heads`.
        head_kwargs: keyword arguments of the head (e.g. ``{"reduction": 256}``).
        class_names: stored with the checkpoint so exports can name their outputs.
        preprocessing: the test-time preprocessing (stored for exports).
        optimizer: ``"sgd"`` (momentum 0.9), ``"adamw"`` or ``"adam"``.
        lr: base learning rate; each part's is ``lr * lr_mult[part]``.
        lr_mult: multipliers for ``backbone``, ``head`` and ``classifier``.
        weight_decay: L2 penalty on all parameters.
        scheduler: ``"constant"``, ``"step"`` (×``lr_gamma`` at each epoch in ``lr_steps``)
            or ``"cosine"`` (to 0 over ``trainer.max_epochs``).
        label_smoothing: of the cross-entropy loss.
        test_flip: average the logits of each test image and its horizontal flip.
        dropout: dropout before the classifier.
        weight_decay_mult: multipliers of ``weight_decay`` per part (e.g. ``{"classifier": 0}``: the B-CNN and
            G²DeNet code decays the backbone only).
        loss: ``"cross_entropy"`` or ``"one_vs_all_hinge"`` (LRBP's SVM loss), see :mod:`finegrained.losses`.
        clip_activation_grad: clamp the loss's derivative with respect to every layer's output to this bound
            (G²DeNet's code clips back-propagated activation derivatives at ±1; not parameter gradients).
        backbone_layers: backbone layers whose maps the head receives together (HIHCA: ``["relu5_2", "relu5_3"]``).
        stage1_epochs: the first stage of the two-stage protocols (B-CNN, CBP, G²DeNet, HIHCA): the
            classifier (and the head, on the ``"frozen"`` route) trains alone on the frozen backbone.
        stage1_route: ``"frozen"``: the first ``stage1_epochs`` epochs of the fit run with the backbone
            frozen (weights and BN statistics) at ``stage1_lr``, the schedule then runs over the rest;
            ``"cached"``: before the fit, head features of the training images (evaluation transform: no
            augmentation, as the official code caches them) are extracted once and the classifier alone
            trains on them for ``stage1_epochs`` epochs (SGD, batch ``stage1_batch_size``), then every
            epoch of the fit is stage 2. Both skip stage 1 when resuming.
        stage1_lr, stage1_weight_decay, stage1_batch_size: of the first stage.
        stage1_lr_steps, stage1_lr_gamma: the first stage's learning rate is ×gamma at each of these epochs
            (compact bilinear pooling's multistep schedule).
        stage1_init_std, stage1_init_bias: when set, the classifier starts stage 1 from N(0, std²) weights and
            this bias (G²DeNet's code: 0.001 and 0.1).
        init_from: a checkpoint of this class to start from (fine-tuning a trained model on new
            data). Tensors whose shapes differ, such as a classifier for another number of classes,
            are left at their initialisation; what was dropped is printed.
        data_init_images, data_init_seed: a head with a data-dependent initialisation (NetVLAD's k-means,
            LRBP's PCA) gets it before the first training step, from the backbone features (evaluation
            mode) of this many training images drawn with this seed; computed on rank 0 and broadcast to
            every process; not when resuming from a checkpoint or starting from ``init_from``.
        channels_last: keep the backbone's convolution weights and every batch of images in channels-last
            memory format (faster convolutions with bf16/fp16 on recent GPUs; a transformer's patch
            embedding is its only convolution, so there it changes little). Values are unchanged.
    """

    def __init__(self, num_classes: int, backbone: Union[str, nn.Module] = "resnet50",
                 backbone_weights: Optional[str] = "imagenet",
                 last_stride: int = 2, head: str = "isqrt", head_kwargs: Optional[Dict[str, Any]] = None,
                 class_names: Optional[List[str]] = None, preprocessing: Optional[Dict[str, Any]] = None,
                 optimizer: str = "sgd", lr: float = 1.2e-3, momentum: float = 0.9,
                 lr_mult: Optional[Dict[str, float]] = None, weight_decay: float = 1e-4,
                 scheduler: str = "constant", lr_steps: Optional[List[int]] = None, lr_gamma: float = 0.1,
                 label_smoothing: float = 0.0, test_flip: bool = True, dropout: float = 0.0,
                 stage1_epochs: int = 0, stage1_lr: float = 1.0, init_from: Optional[str] = None,
                 data_init_images: int = 128, data_init_seed: int = 0,
                 weight_decay_mult: Optional[Dict[str, float]] = None, loss: str = "cross_entropy",
                 clip_activation_grad: Optional[float] = None, backbone_layers: Optional[List[str]] = None,
                 stage1_route: str = "frozen", stage1_weight_decay: float = 0.0, stage1_batch_size: int = 256,
                 stage1_init_std: Optional[float] = None, stage1_init_bias: float = 0.0,
                 stage1_lr_steps: Optional[List[int]] = None, stage1_lr_gamma: float = 0.1,
                 channels_last: bool = False):
        super().__init__()
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"num_classes={num_classes} but {len(class_names)} class names were given")
        check_settings(optimizer, scheduler, lr_mult, stage1_epochs, weight_decay_mult, stage1_route)
        self.loss_fn = loss_function(loss, label_smoothing)
        if isinstance(backbone, nn.Module):
            # A module is not a hyperparameter (checkpoints stay loadable with weights_only=True): record its
            # class; load_from_checkpoint(path, backbone=<the same module class, built again>) restores it.
            self.save_hyperparameters(ignore=["backbone"])
            self.hparams.backbone = f"module:{type(backbone).__name__}"
            self.hparams.backbone_weights = backbone_weights = None  # the module comes with its own weights
        else:
            self.save_hyperparameters()
        authors = None if isinstance(backbone, nn.Module) or backbone.startswith("timm/") else (
            self._authors_checkpoint(backbone_weights))
        self.backbone = build_backbone(backbone, weights=authors.trunk if authors else backbone_weights,
                                       last_stride=last_stride, layers=backbone_layers)
        self.head = build_head(head, self.backbone.out_channels, num_classes=num_classes,
                               class_token_dim=self.backbone.class_token_dim, **(head_kwargs or {}))
        # The class token reaches the heads that use it (SoT) and no other.
        self.backbone.return_class_token = self.head.uses_class_token and self.backbone.class_token_dim > 0
        if authors:
            self._load_authors_head(authors, backbone_weights)
        if self.head.produces_logits:
            self.classifier = nn.Identity()
        else:
            linear = nn.Linear(self.head.output_dim, num_classes)
            if self.head.classifier_init_std is not None:
                nn.init.trunc_normal_(linear.weight, std=self.head.classifier_init_std)
                nn.init.zeros_(linear.bias)
            self.classifier = nn.Sequential(nn.Dropout(dropout) if dropout else nn.Identity(), linear)
        self.lr_mult = {**DEFAULT_LR_MULT, **(lr_mult or {})}
        self.val_metrics = accuracy_metrics(num_classes, "val_")
        self.test_metrics = accuracy_metrics(num_classes, "test_")
        self.test_confusion = MulticlassConfusionMatrix(num_classes)
        if init_from:
            self.dropped_from_init = self.load_matching_weights(init_from)
        if clip_activation_grad:
            clip_activation_gradients(self, clip_activation_grad)
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)

    def _in_memory_format(self, images: Tensor) -> Tensor:
        # Here rather than in on_after_batch_transfer, which Lightning warns about beside a DataModule.
        if self.hparams.get("channels_last") and images.dim() == 4:
            return images.contiguous(memory_format=torch.channels_last)
        return images

    @staticmethod
    def _authors_checkpoint(backbone_weights) -> Optional[SplitCheckpoint]:
        """The file's split when ``backbone_weights`` is one of the authors' second-order models (finegrained.pretrained)."""
        if backbone_weights is None or str(backbone_weights) == "imagenet" or not os.path.isfile(str(backbone_weights)):
            return None
        return split_authors_checkpoint(read_state_dict(str(backbone_weights)), str(backbone_weights))

    def _load_authors_head(self, split: SplitCheckpoint, source: str) -> None:
        """The reduction trained with the authors' head goes into this head when it has the same block."""
        own = self.head.state_dict()
        if all(k in own and own[k].shape == v.shape for k, v in split.head.items()):
            self.head.load_state_dict(split.head, strict=False)
            blocks = sorted({"head." + k.rsplit(".", 1)[0] for k in split.head})
            reduction = f"{len(split.head)} reduction tensors -> {', '.join(blocks)}"
        else:
            reduction = (f"reduction dropped ({self.hparams.head} with head_kwargs {self.hparams.head_kwargs or {}} "
                         f"has no block of its shape)")
        rank_zero_info(f"backbone_weights {source}: {split.layout}: {len(split.trunk)} tensors -> backbone; "
                       f"{reduction}; dropped {', '.join(split.dropped) or 'nothing'}")
        if self.hparams.last_stride != 1:
            rank_zero_info(f"backbone_weights {source}: the authors trained layer4 with stride 1 (last_stride: 1)")

    def load_matching_weights(self, checkpoint_path: str) -> List[str]:
        """Copy the tensors of ``checkpoint_path`` whose names and shapes match; returns the dropped names (logged
        once, by the first process)."""
        state = _read_checkpoint(checkpoint_path)["state_dict"]
        own = self.state_dict()
        kept = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        dropped = sorted(k for k in state if k not in kept)
        self.load_state_dict(kept, strict=False)
        for name in dropped:
            shape = tuple(state[name].shape)
            where = f"here {tuple(own[name].shape)}" if name in own else "not in this model"
            rank_zero_info(f"init_from {checkpoint_path}: dropped {name} {shape} ({where})")
        rank_zero_info(f"init_from {checkpoint_path}: loaded {len(kept)} tensors, dropped {len(dropped)}")
        return dropped

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
        check_weights_fit(self.state_dict(), checkpoint.get("state_dict", {}),
                          self._trainer.ckpt_path if self._trainer is not None else None)

    # -- inference ------------------------------------------------------------------------
    def forward(self, images: Tensor) -> Tensor:
        return self.classifier(self.head(self.backbone(images)))

    def inference_network(self) -> "InferenceNetwork":
        """The network ``finegrained test`` evaluates, as a plain module (what export writes)."""
        return InferenceNetwork(self.backbone, self.head, self.classifier, self.hparams.test_flip)

    def predict_logits(self, images: Tensor) -> Tensor:
        """Logits, averaged with those of the flipped images when ``test_flip`` is set."""
        return self.inference_network()(images)

    # -- the two-stage protocol (finegrained.optim) ----------------------------------------------
    @property
    def backbone_frozen(self) -> bool:
        """In stage 1 of a fit on the frozen route: the backbone is frozen (evaluation mode, no autograd,
        learning rate 0)."""
        trainer = self._trainer
        return (trainer is not None and trainer.state.fn == "fit" and self.hparams.stage1_route == "frozen"
                and backbone_frozen(self.current_epoch, self.hparams.stage1_epochs))

    def train(self, mode: bool = True):
        # Lightning puts the whole model back in training mode after every validation, mid-epoch ones
        # included: a frozen backbone must keep its BatchNorm statistics.
        super().train(mode)
        if mode and self.backbone_frozen:
            self.backbone.eval()
        return self

    # -- what happens once before the first training step --------------------------------------------
    def on_train_start(self) -> None:
        self._data_dependent_init()
        hp = self.hparams
        if hp.stage1_epochs and hp.stage1_init_std is not None and not self.trainer.ckpt_path:
            self._initialise_classifier(hp.stage1_init_std, hp.stage1_init_bias)
        if hp.stage1_route == "cached" and hp.stage1_epochs:
            self._cached_stage1()

    @torch.no_grad()
    def _initialise_classifier(self, std: float, bias: float) -> None:
        """The official two-stage code starts its classifier from N(0, std²) weights and a constant bias
        (compact bilinear pooling: 1e-4 and 0; G²DeNet: 0.001 and 0.1); the same on every process."""
        linear = [m for m in self.classifier.modules() if isinstance(m, nn.Linear)][-1]
        generator = torch.Generator().manual_seed(self.hparams.data_init_seed)
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * std)
        linear.bias.fill_(bias)

    def _data_dependent_init(self) -> None:
        if not self.head.has_data_init:
            return
        if self.trainer.ckpt_path or self.hparams.init_from:
            rank_zero_info(f"{self.hparams.head}: data-dependent initialisation skipped: the weights come from "
                           f"{self.trainer.ckpt_path or self.hparams.init_from}")
            return
        state = None
        if self.trainer.is_global_zero:
            features = self._backbone_features(self.trainer.train_dataloader, self.hparams.data_init_images,
                                               self.hparams.data_init_seed)
            init_head_from_data(self.head, features, self.hparams.data_init_seed)
            state = {k: v.cpu() for k, v in self.head.state_dict().items()}
        state = self.trainer.strategy.broadcast(state, src=0)  # every process starts from rank 0's result
        self.head.load_state_dict(state)

    def _cached_stage1(self) -> None:
        """Stage 1 on cached features: head outputs of the un-augmented training images, extracted once on
        rank 0; the classifier alone trains on them (:func:`finegrained.optim.train_on_cached_features`) and
        every process receives the result."""
        hp = self.hparams
        if self.trainer.ckpt_path:
            rank_zero_info(f"stage 1 (cached features) skipped: resuming from {self.trainer.ckpt_path}")
            return
        if self.head.produces_logits:
            raise ValueError(f"stage1_route 'cached' trains a classifier on head features, but {hp.head} computes "
                             f"class scores itself; use stage1_route 'frozen' or stage1_epochs 0")
        state = None
        if self.trainer.is_global_zero:
            started = time.perf_counter()
            loader = self._unaugmented_training_loader()
            features, labels = self.head_features(loader)
            loss = train_on_cached_features(self.classifier, features, labels, self.loss_fn, hp.stage1_epochs,
                                            hp.stage1_lr, hp.stage1_weight_decay, hp.stage1_batch_size,
                                            hp.momentum, hp.data_init_seed, self.device, hp.stage1_lr_steps or (),
                                            hp.stage1_lr_gamma)
            rank_zero_info(f"stage 1 on cached features: {len(labels)} images, {features.shape[1]:,}-d, "
                           f"{hp.stage1_epochs} epochs at lr {hp.stage1_lr:g} (weight decay {hp.stage1_weight_decay:g}, "
                           f"batch {hp.stage1_batch_size}): last loss {loss:.4f} ({time.perf_counter() - started:.0f} s)")
            state = {k: v.cpu() for k, v in self.classifier.state_dict().items()}
        self.classifier.load_state_dict(self.trainer.strategy.broadcast(state, src=0))

    def _unaugmented_training_loader(self):
        """The training images with the evaluation transform (the official code caches un-augmented features);
        the training loader itself when the DataModule cannot give them."""
        datamodule = self.trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "unaugmented_train_dataloader"):
            return datamodule.unaugmented_train_dataloader()
        rank_zero_info("stage 1 (cached features): the DataModule has no unaugmented_train_dataloader(); "
                       "caching features of the augmented training loader")
        return self.trainer.train_dataloader

    @torch.no_grad()
    def head_features(self, loader, flip: bool = False) -> Tuple[Tensor, Tensor]:
        """Head outputs (float16, on the CPU) and (N,) labels of every batch of ``loader``, backbone and head in
        evaluation mode: (N, D), or with ``flip`` (N, 2, D) for each image and its horizontal flip."""
        was_training = self.training
        self.eval()
        features, labels = [], []
        for images, targets in tqdm(loader, desc="head features", unit="batch"):
            images = images.to(self.device)
            views = [images, torch.flip(images, dims=[3])] if flip else [images]
            rows = [self.head(self.backbone(view)).float().to("cpu", torch.float16) for view in views]
            features.append(torch.stack(rows, dim=1) if flip else rows[0])
            labels.append(torch.as_tensor(targets).cpu())
        self.train(was_training)
        return torch.cat(features), torch.cat(labels)

    @torch.no_grad()
    def _backbone_features(self, loader, images: int, seed: int) -> Tensor:
        """Backbone features (evaluation mode, on the CPU) of ``images`` training images drawn with ``seed``."""
        dataset = loader.dataset
        chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:images].tolist()
        subset = DataLoader(Subset(dataset, chosen), batch_size=loader.batch_size, num_workers=loader.num_workers,
                            collate_fn=loader.collate_fn)
        was_training = self.backbone.training
        self.backbone.eval()
        features = []
        with isolate_rng():
            torch.manual_seed(seed)  # the training transforms' crops and flips too
            for batch in subset:
                features.append(self.backbone(batch[0].to(self.device)).float().cpu())
        self.backbone.train(was_training)
        return torch.cat(features)

    def on_train_epoch_start(self) -> None:
        self.train()
        hp = self.hparams
        if hp.stage1_epochs and hp.stage1_route == "frozen":
            optimizer = self.optimizers().optimizer
            stage_weight_decay(optimizer, self.backbone_frozen, hp.stage1_weight_decay)
            if self.current_epoch == hp.stage1_epochs:
                forget_state(optimizer, self.backbone)

    # -- steps ----------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        images, labels = batch
        images = self._in_memory_format(images)
        if self.backbone_frozen:
            with torch.no_grad():
                features = self.backbone(images)
            logits = self.classifier(self.head(features))
        else:
            logits = self(images)
        loss = self.loss_fn(logits, labels)
        if self.backbone_frozen:  # several processes need every trainable parameter in the loss
            loss = loss + zero_through(self.backbone)
        # sync_dist: under DDP the epoch values are over every rank's images, not rank 0's share.
        if self.head.aux_loss is not None:  # e.g. GM-SOP's load-balance loss
            self.log("train_aux_loss", self.head.aux_loss, on_step=True, on_epoch=True, sync_dist=True,
                     batch_size=len(labels))
            loss = loss + self.head.aux_loss
        acc = (logits.argmax(1) == labels).float().mean()
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True, batch_size=len(labels))
        self.log("train_top1", acc, prog_bar=True, on_step=False, on_epoch=True, sync_dist=True, batch_size=len(labels))
        return loss

    def _evaluate(self, batch, metrics: MetricCollection, stage: str):
        images, labels = batch
        images = self._in_memory_format(images)
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
        images = self._in_memory_format(batch[0] if isinstance(batch, (list, tuple)) else batch)
        return self.predict_logits(images).softmax(dim=1)

    # -- optimisation (finegrained.optim) ------------------------------------------------
    def parts(self) -> Dict[str, nn.Module]:
        return {"backbone": self.backbone, "head": self.head, "classifier": self.classifier}

    def parameter_groups(self) -> List[Dict[str, Any]]:
        """One group per part (and per prefix of the head's ``parameter_lr_mult``), each with its own learning
        rate and weight decay (frozen parameters left out)."""
        hp = self.hparams
        return parameter_groups(self.parts(), hp.lr, self.lr_mult, hp.weight_decay, hp.weight_decay_mult,
                                {"head": self.head.parameter_lr_mult})

    def configure_optimizers(self):
        return configure_optimizers(self.parts(), self.hparams, self.lr_mult, self.trainer.max_epochs,
                                    {"head": self.head.parameter_lr_mult})


def _read_checkpoint(checkpoint_path: str, map_location: str = "cpu") -> Dict[str, Any]:
    """A Lightning checkpoint of this class, read with ``weights_only=True``."""
    checkpoint = read_checkpoint_file(checkpoint_path, map_location=map_location)
    if not isinstance(checkpoint, dict) or "hyper_parameters" not in checkpoint or "state_dict" not in checkpoint:
        raise ValueError(f"{checkpoint_path}: not a FineGrainedClassifier checkpoint "
                         f"(expected 'hyper_parameters' and 'state_dict' entries)")
    return checkpoint


def load_classifier(checkpoint_path: str, map_location: str = "cpu") -> FineGrainedClassifier:
    """Rebuild a trained classifier from a Lightning checkpoint, reading it with ``weights_only=True``.

    The backbone is built without pretrained weights (the checkpoint holds all of them), so
    this works offline for any backbone.
    """
    return classifier_from_checkpoint(_read_checkpoint(checkpoint_path, map_location), checkpoint_path)


def classifier_from_checkpoint(checkpoint: Dict[str, Any], source: Optional[str] = None) -> FineGrainedClassifier:
    """:func:`load_classifier` for a checkpoint already read (``{"hyper_parameters", "state_dict", ...}``)."""
    accepted = inspect.signature(FineGrainedClassifier.__init__).parameters
    # LightningCLI adds bookkeeping entries such as "_instantiator"; keep constructor arguments only.
    hparams = {k: v for k, v in checkpoint["hyper_parameters"].items() if k in accepted}
    model = FineGrainedClassifier(**{**hparams, **WEIGHTS_IN_CHECKPOINT})
    check_weights_fit(model.state_dict(), checkpoint["state_dict"], source)
    model.load_state_dict(checkpoint["state_dict"])
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
