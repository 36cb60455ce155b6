"""python -m resnet_jax.sweep: expand a sweep definition into runs and launch the unfinished ones."""

from resnet_jax.sweep import cli

cli()
