"""The version of finegrained, defined here once (setup.cfg, CITATION.cff and the records read it)."""

__version__ = "0.1.0"
