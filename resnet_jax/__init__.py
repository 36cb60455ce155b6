"""resnet_jax: residual networks and their skip-connection design space in JAX/Flax."""
