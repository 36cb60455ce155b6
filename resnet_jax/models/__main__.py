"""python -m resnet_jax.models [name...]: parameter count, multiply-accumulates and input shape of each preset."""

from resnet_jax import cli
from resnet_jax.models.summary import main

cli.run(main)
