"""Ghost BatchNorm on 8 CPU devices against per-group statistics computed by hand, for several meshes.

Run by test_protocols.py in a subprocess, because the 8 CPU devices must be requested before JAX
starts: XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/ghost_batchnorm.py
Prints one JSON line: for each (mesh, group size), the largest differences from the reference and
whether the compiled normalisation (without the running averages) holds a collective.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from helpers import tiny_config
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_jax import sharding
from resnet_jax.errors import ConfigError
from resnet_jax.models.resnet import BatchNorm
from resnet_jax.train import config as config_lib

BATCH, EPS, MOMENTUM = 32, 1e-5, 0.9
COLLECTIVES = ('all-reduce', 'all-gather', 'all-to-all', 'collective-permute', 'reduce-scatter')


def by_hand(x, scale, bias, mean0, var0, group):
    """Each group normalised by its own statistics (float64); running averages of the groups' mean and
    n/(n-1) x variance, n the values per channel in a group."""
    g = x.astype(np.float64).reshape(BATCH // group, group, *x.shape[1:])
    mean, var = g.mean((1, 2, 3), keepdims=True), g.var((1, 2, 3), keepdims=True)
    y = ((g - mean) / np.sqrt(var + EPS) * scale + bias).reshape(x.shape)
    n = group * x.shape[1] * x.shape[2]
    return y, (MOMENTUM * mean0 + (1 - MOMENTUM) * mean.mean(0).ravel(),
               MOMENTUM * var0 + (1 - MOMENTUM) * (var * n / (n - 1)).mean(0).ravel())


def check(mesh, group, x, variables):
    module = BatchNorm(use_running_average=False, group_size=group)
    spec = NamedSharding(mesh, P(sharding.BATCH_AXES))
    xs = jax.device_put(x, spec)

    def train(v, x):
        return module.apply(v, x, mutable=['batch_stats'])

    y, stats = jax.jit(train, in_shardings=(NamedSharding(mesh, P()), spec))(variables, xs)
    normalise_only = jax.jit(lambda v, x: train(v, x)[0], in_shardings=(NamedSharding(mesh, P()), spec),
                             out_shardings=spec).lower(variables, xs).compile().as_text()
    p, s = variables['params'], variables['batch_stats']
    y_ref, (mean_ref, var_ref) = by_hand(x, np.asarray(p['scale']), np.asarray(p['bias']), np.asarray(s['mean']),
                                         np.asarray(s['var']), group)
    return {'y': float(np.max(np.abs(np.asarray(y) - y_ref))),
            'mean': float(np.max(np.abs(np.asarray(stats['batch_stats']['mean']) - mean_ref))),
            'var': float(np.max(np.abs(np.asarray(stats['batch_stats']['var']) - var_ref))),
            'collective': any(c in normalise_only for c in COLLECTIVES),
            'sharded': str(y.sharding.spec)}


if __name__ == '__main__':
    devices = jax.devices()
    assert len(devices) == 8, f'needs 8 devices, got {len(devices)}'
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, (BATCH, 3, 3, 5)).astype(np.float32)
    variables = {'params': {'scale': jnp.asarray(rng.uniform(0.5, 1.5, 5), jnp.float32),
                            'bias': jnp.asarray(rng.normal(0, 1, 5), jnp.float32)},
                 'batch_stats': {'mean': jnp.asarray(rng.normal(0, 1, 5), jnp.float32),
                                 'var': jnp.asarray(rng.uniform(0.5, 2, 5), jnp.float32)}}
    meshes = {'8x1': (8, 1, devices), '2x4': (2, 4, devices), '4x2': (4, 2, devices), '2x1': (2, 1, devices[:2]),
              '1x1': (1, 1, devices[:1])}
    results = {}
    for name, (data, fsdp, devs) in meshes.items():
        mesh = Mesh(np.asarray(devs).reshape(data, fsdp), sharding.BATCH_AXES)
        for group in (2, 4, 8, 16):
            results[f'{name},{group}'] = check(mesh, group, x, variables)
    # The config refuses groups that would straddle devices: 8 devices x 6 examples in groups of 4.
    config = tiny_config(**{'model.bn_group_size': 4, 'batch_size': 48})
    try:
        config_lib.validate(config, 8)
        results['refused'] = ''
    except ConfigError as e:
        results['refused'] = str(e)
    json.dump(results, sys.stdout)
