"""Tests of finegrained.serve."""
