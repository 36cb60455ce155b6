"""Helpers shared by the model tests."""

import jax
import jax.numpy as jnp
import numpy as np


def init_variables(model, x, seed=0):
    """Initialise `model` on `x` and give every BatchNorm random statistics, so eval-mode
    tests exercise the running mean and variance instead of the trivial (0, 1)."""
    variables = model.init({'params': jax.random.key(seed), 'dropout': jax.random.key(seed + 1)}, x)
    if 'batch_stats' not in variables:
        return variables
    rng = np.random.default_rng(seed)

    def randomize(path, value):
        if path[-1].key == 'mean':
            return jnp.asarray(rng.normal(0, 0.5, value.shape), value.dtype)
        return jnp.asarray(rng.uniform(0.5, 2.0, value.shape), value.dtype)

    return dict(variables, batch_stats=jax.tree_util.tree_map_with_path(randomize, variables['batch_stats']))


def sown(model, variables, x, train=False, rngs=None):
    """Run `model` and return (output, intermediates collection)."""
    mutable = ['intermediates', 'batch_stats'] if train else ['intermediates']
    out, state = model.apply(variables, x, train=train, rngs=rngs, mutable=mutable)
    return out, state['intermediates']


def images(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)
