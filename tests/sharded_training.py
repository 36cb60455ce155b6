"""Train a few steps on 1 device, 8-way data parallel and 2x4 FSDP; print the largest differences.

Run by test_train.py in a subprocess, because the 8 CPU devices must be requested before
JAX starts: XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_training.py
"""

import json
import sys

import jax
import numpy as np
from helpers import tiny_config

from resnet_jax import sharding
from resnet_jax.data import arrays
from resnet_jax.train.run import Run

STEPS = 4


def train(devices, data, fsdp):
    config = tiny_config()
    config.mesh.data, config.mesh.fsdp = data, fsdp
    config.mesh.param_rules = (('.*kernel', 'fsdp'),)
    config.mesh.fsdp_min_size = 1
    run = Run(config, devices)
    state = run.initial_state()
    batches = arrays.train_batches(run.train_data, config.batch_size, config.seed)
    rng = jax.random.key(config.seed)
    for _ in range(STEPS):
        state, _ = run.train_step(state, sharding.global_batch(next(batches), run.mesh), rng)
    kernel = state.params['stage2_block0']['conv1']['kernel']
    return jax.device_get({'params': state.params, 'batch_stats': state.batch_stats}), kernel.sharding.spec


def max_difference(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


if __name__ == '__main__':
    devices = jax.devices()
    assert len(devices) == 8, f'needs 8 devices, got {len(devices)}'
    single, _ = train(devices[:1], 1, 1)
    data_parallel, dp_spec = train(devices, 8, 1)
    fsdp, fsdp_spec = train(devices, 2, 4)
    json.dump({'data_parallel': max_difference(single, data_parallel), 'fsdp': max_difference(single, fsdp),
               'moved': max_difference(single['params'], jax.device_get(Run(tiny_config(), devices[:1]).initial_state().params)),
               'fsdp_spec': str(fsdp_spec), 'dp_spec': str(dp_spec)}, sys.stdout)
