"""finegrained: fine-grained image classification with second-order (covariance) pooling.

Library layout (what may import what is checked by ``tests/test_layout.py``):

* :mod:`finegrained.ops` -- matrix functions by family (covariance, Newton–Schulz, eig, substitutes, sketch).
* :mod:`finegrained.heads` -- one pooling head per method, and :func:`build_head`.
* :mod:`finegrained.backbones` -- ImageNet CNNs cut at their last conv map, :func:`build_backbone`; any timm model.
* :mod:`finegrained.network` -- :class:`FineGrainedNetwork`, backbone -> head -> classifier as a plain
  ``nn.Module`` (no Lightning), its weights from :mod:`finegrained.network_weights`.
* :mod:`finegrained.optim` -- optimiser settings, parameter groups, schedules, the two-stage protocol's pieces.
* :mod:`finegrained.callbacks` -- the papers' protocols as Lightning callbacks (two-stage fine-tuning,
  data-dependent initialisation, activation-gradient clipping, the SVM test).
* :mod:`finegrained.model` -- :class:`FineGrainedClassifier`, the LightningModule around the network.
* :mod:`finegrained.data_contract` -- what the library expects of a DataModule (:mod:`datamodules` follows it).
* :mod:`finegrained.export`, :mod:`finegrained.predict` -- ONNX / TorchScript artifacts and their use.
* :mod:`finegrained.cli` -- the ``finegrained`` command, one module per command family.
* tooling apart from the library: :mod:`finegrained.bench` (benchmarks), :mod:`finegrained.results`
  (run records, tables, plots) and :mod:`finegrained.launch` (campaigns on SLURM or this machine, submitit).
"""
from finegrained.heads import available_heads, build_head  # noqa: F401
from finegrained.network import FineGrainedNetwork  # noqa: F401

from finegrained.version import __version__  # noqa: F401
