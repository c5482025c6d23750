"""Tests of the datamodules package: every dataset in its official layout, the contract, bad input."""
