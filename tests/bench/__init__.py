"""Tests of finegrained.bench."""
