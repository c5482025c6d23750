"""Tests of finegrained.ops."""
