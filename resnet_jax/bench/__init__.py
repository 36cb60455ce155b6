"""Benchmarks: the training step (measure, `python -m resnet_jax.bench`) and the input pipeline (throughput)."""
