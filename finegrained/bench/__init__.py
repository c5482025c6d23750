"""Benchmarks (tooling, apart from the library): measured speed against baselines measured in the same run.

* :mod:`finegrained.bench.timing` -- interleaved medians, saved-tensor memory, CSV records;
* :mod:`finegrained.bench.baselines` -- plain-autograd and official-algorithm references;
* :mod:`finegrained.bench.heads`, :mod:`~finegrained.bench.loader`, :mod:`~finegrained.bench.step`
  -- ``finegrained bench heads|loader|step``;
* :mod:`finegrained.bench.table` -- ``finegrained bench-table``: every head on real images on a CPU.
"""
