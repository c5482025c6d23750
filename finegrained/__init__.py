"""finegrained: fine-grained image classification with second-order (covariance) pooling.

Library layout (see ``../shared/reference/architecture.md`` in the project docs):

* :mod:`finegrained.linalg` -- matrix functions (covariance, iSQRT Newton–Schulz, ...).
* :mod:`finegrained.heads` -- one pooling head per method, and :func:`build_head`.
* :mod:`finegrained.backbones` -- ImageNet CNNs cut at their last conv map, :func:`build_backbone`.
* :mod:`finegrained.model` -- :class:`FineGrainedClassifier`, the LightningModule.
* :mod:`finegrained.cli` -- the ``finegrained`` command.
"""
from finegrained.heads import available_heads, build_head  # noqa: F401

__version__ = "0.1.0"
