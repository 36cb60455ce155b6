"""Training: configs, optimizers, sharding, the pure steps, the loop and its metrics."""
