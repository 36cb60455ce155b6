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


def tiny_config(**overrides):
    """A ResNet-8 of width 8 on 8x8 'shapes' images: a real run that compiles in seconds."""
    from pathlib import Path

    from resnet_jax.train.config import from_file

    c = from_file(str(Path(__file__).parents[1] / 'experiments' / 'quickstart.py'))
    c.model.stage_sizes = (1, 1, 1)
    c.model.widths = (8, 16, 32)
    c.model.stem_width = 8
    c.data.image_size = 8
    c.data.num_train = 512
    c.data.num_eval = 103
    c.batch_size = 32
    c.eval_batch_size = 24
    c.num_steps = 8
    c.optim.warmup_steps = 2
    c.log_every_steps = 4
    c.eval_every_steps = 8
    c.checkpoint_every_steps = 8
    c.progress_seconds = 0.0
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split('.')
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c
