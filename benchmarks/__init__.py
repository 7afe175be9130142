"""Benchmarks of the Joiner's fast paths and of the training loop (``python -m benchmarks.run``)."""
