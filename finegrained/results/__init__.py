"""Results (tooling, apart from the library): run records, comparison tables and plots.

* :mod:`finegrained.results.runs` -- one CSV row per ``finegrained test`` run, and the Lightning
  callback that saves each run's curves and confusion matrix;
* :mod:`finegrained.results.tables` -- the papers' numbers beside ours (``finegrained tables``);
* :mod:`finegrained.results.plots` -- training curves, confusion matrices, accuracy versus dimension.
"""
