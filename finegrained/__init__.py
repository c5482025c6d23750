"""finegrained: fine-grained image classification with second-order (covariance) pooling.

Library layout (see ``../shared/reference/architecture.md`` in the project docs):

* :mod:`finegrained.ops` -- matrix functions by family (covariance, Newton–Schulz, eig, substitutes, sketch).
* :mod:`finegrained.heads` -- one pooling head per method, and :func:`build_head`.
* :mod:`finegrained.backbones` -- ImageNet CNNs cut at their last conv map, :func:`build_backbone`.
* :mod:`finegrained.optim` -- parameter groups, schedules and the two-stage protocol.
* :mod:`finegrained.model` -- :class:`FineGrainedClassifier`, the LightningModule.
* :mod:`finegrained.export`, :mod:`finegrained.predict` -- ONNX / TorchScript artifacts and their use.
* :mod:`finegrained.cli` -- the ``finegrained`` command, one module per command family.
* tooling apart from the library: :mod:`finegrained.bench` (benchmarks) and :mod:`finegrained.results`
  (run records, tables, plots).
"""
from finegrained.heads import available_heads, build_head  # noqa: F401

__version__ = "0.1.0"
