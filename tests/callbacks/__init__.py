"""Tests of finegrained.callbacks."""
