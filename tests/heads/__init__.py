"""Tests of finegrained.heads."""
