"""Tests of finegrained.backbones."""
