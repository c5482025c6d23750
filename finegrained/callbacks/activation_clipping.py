"""G²DeNet's activation-derivative clipping (Wang, Li, Zhang, "G²DeNet: Global Gaussian Distribution Embedding
Network and Its Application to Visual Recognition", CVPR 2017): its MatConvNet code clamps the derivative of the
loss with respect to the output of every layer at ±1 as it flows back (``vl_GlbGaussian_nn.m``); parameter
gradients are not clipped."""
from __future__ import annotations

from typing import List, Optional

import pytorch_lightning as pl
from torch import Tensor, nn


def clip_activation_gradients(module: nn.Module, bound: float) -> list:
    """Clamp the derivative of the loss with respect to the output of every leaf layer of ``module`` to
    [−bound, bound] as it flows back. Returns the hook handles."""

    def clamp_output(layer, inputs, output):
        if isinstance(output, Tensor) and output.requires_grad:
            output.register_hook(lambda grad: grad.clamp(-bound, bound))

    return [m.register_forward_hook(clamp_output) for m in module.modules() if not list(m.children())]


class ActivationGradientClipping(pl.Callback):
    """Args:
        bound: clamp every layer's output derivative to [−bound, bound] during the fit (None: off)."""

    def __init__(self, bound: Optional[float] = None):
        if bound is not None and not bound > 0:
            raise ValueError(f"clip_activation_grad bound must be > 0, got {bound}")
        self.bound = bound
        self._handles: List = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.bound and stage == "fit" and not self._handles:
            self._handles = clip_activation_gradients(pl_module, self.bound)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
