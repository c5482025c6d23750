"""Tests of finegrained.cli."""
