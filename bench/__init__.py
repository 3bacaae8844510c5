"""Benchmarks of lowrank_op against its baselines; see bench/conftest.py for how to run them."""
