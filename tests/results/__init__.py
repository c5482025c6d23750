"""Tests of finegrained.results."""
