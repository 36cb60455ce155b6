"""Populations against standalone runs: the configs, the two trainings and their differences.

Run as a script in one subprocess (the 8 CPU devices must be requested before JAX starts) for both
comparisons of test_population.py:
XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/population_runs.py
It prints, as JSON, the largest differences between the 4 standalone runs on one device and the population
of 4 on one device, and laid over 8 devices (4 member shards x 2 data shards); and the collectives in the
compiled step of 8 members over 8 devices (one member per device: there should be none); and the
largest difference between the looped and the vmapped eval step of the population on one device.
With the argument `alphas` (for test_population_mix.py, one device) it prints the differences of the members
with their own mixup and CutMix alphas (ALPHAS) from their standalone runs.
"""

import json
import sys

import jax
import numpy as np
from helpers import tiny_config

from resnet_jax import sharding
from resnet_jax.data import arrays, pipeline
from resnet_jax.train.population import Population
from resnet_jax.train.run import Run

STEPS = 3
# Members run the same arithmetic as their standalone runs, with the member axis batched into the
# convolutions (grouped) and reductions: float32 summation order differs, by ~1e-7 on parameters, batch
# statistics and metrics of order 0.1-3 after 3 steps. 1e-5 absolute bounds that with room, and is far below
# what one step moves (the test checks that the parameters moved by more than 1e-2).
TOLERANCE = 1e-5
COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'collective-permute', 'all-to-all')
# (mixup_alpha, cutmix_alpha) of four members: mixup only, CutMix only, neither, both.
ALPHAS = [(0.2, 0.0), (0.0, 1.0), (0.0, 0.0), (0.4, 1.0)]


def member_configs(learning_rates=(0.1, 0.05, 0.2, 0.1)):
    """Two seeds x {ResNet, its plain twin}, each at its own learning rate: a ResNet-8 of width 8 on 8x8
    synthetic images, batch 8."""
    members = [(seed, name) for seed in (0, 1) for name in ('resnet20', 'plain20')]
    return [tiny_config(**{'data.dataset': 'synthetic', 'batch_size': 8, 'model.name': name, 'seed': seed,
                           'optim.lr': lr}) for (seed, name), lr in zip(members, learning_rates)]


def configs_with_alphas(alphas):
    """member_configs() with each member's (mixup_alpha, cutmix_alpha)."""
    configs = member_configs()
    for config, (m, c) in zip(configs, alphas):
        config.data.mixup_alpha, config.data.cutmix_alpha = m, c
    return configs


def train_population(configs, devices, steps=STEPS, mode='vmap_step'):
    """(params and batch stats with a leading member axis, per-step metrics with a member axis) after `steps`
    of the population's `mode` ('vmap_step' or 'loop_step')."""
    population = Population(configs, devices)
    states, rngs, values = population.initial_states(), population.rngs(), population.device_values()
    next_batches, metrics = population.train_inputs(), []
    for _ in range(steps):
        states, m = getattr(population, mode)(states, next_batches(), rngs, values)
        metrics.append(m)
    return jax.device_get(({'params': states.params, 'batch_stats': states.batch_stats}, metrics))


def train_standalone(config, device, steps=STEPS):
    """The same for the standalone run of `config` on one device (no member axis)."""
    run = Run(config, [device])
    state, rng = run.initial_state(), jax.random.key(config.seed)
    batches, metrics = arrays.train_batches(run.train_data, config.batch_size, config.seed), []
    for _ in range(steps):
        state, m = run.train_step(state, sharding.global_batch(next(batches), run.mesh), rng)
        metrics.append(m)
    return jax.device_get(({'params': state.params, 'batch_stats': state.batch_stats}, metrics))


def max_difference(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def member(tree, i):
    """Member i's slice of a tree with a leading member axis."""
    return jax.tree_util.tree_map(lambda x: x[i], tree)


def differences(population, standalone):
    """Per member: the largest difference of (params, batch stats) and of the metrics of every step."""
    (variables, metrics), out = population, []
    for i, (ref_variables, ref_metrics) in enumerate(standalone):
        out.append({'variables': max_difference(member(variables, i), ref_variables),
                    'metrics': max_difference(member(metrics, i), ref_metrics)})
    return out


def eval_loop_vs_vmap(configs, device) -> float:
    """The largest difference between the population's looped and vmapped eval steps on one eval batch."""
    population = Population(configs, [device])
    assert population.eval_step is population.loop_eval  # the members share one CPU device
    states, values = population.initial_states(), population.device_values()
    batch = next(iter(pipeline.eval_batches(configs[0], population.eval_data, 0, 1)))
    return max_difference(population.loop_eval(states, batch, values, False),
                          population.vmap_eval(states, batch, values, False))


def collectives(configs, devices):
    """The collective ops in the compiled vmapped step of `configs` over `devices`."""
    population = Population(configs, devices)
    states = jax.eval_shape(population.initial_states)
    text = population.vmap_step.lower(states, population.train_inputs()(), population.rngs(),
                                       population.device_values()).compile().as_text()
    return sorted({op for op in COLLECTIVES if op in text})


def alphas_differences():
    """The members with their own alphas against their standalone runs, all on the first device."""
    configs, device = configs_with_alphas(ALPHAS), jax.devices()[0]
    return differences(train_population(configs, [device]), [train_standalone(c, device) for c in configs])


if __name__ == '__main__' and sys.argv[1:] == ['alphas']:
    json.dump(alphas_differences(), sys.stdout)
elif __name__ == '__main__':
    devices = jax.devices()
    assert len(devices) == 8, f'needs 8 devices, got {len(devices)}'
    configs = member_configs()
    standalone = [train_standalone(c, devices[0]) for c in configs]
    one = train_population(configs, devices[:1])
    looped = train_population(configs, devices[:1], mode='loop_step')
    sharded = train_population(configs, devices)
    kernels = one[0]['params']['head']['kernel']
    eight = member_configs((0.1, 0.05, 0.2, 0.1)) + member_configs((0.3, 0.02, 0.05, 0.15))
    json.dump({'one_device': differences(one, standalone), 'one_device_loop': differences(looped, standalone),
               'sharded': differences(sharded, standalone),
               'members_differ': float(np.abs(kernels[0] - kernels[2]).max()),
               'moved': max_difference(member(sharded[0]['params'], 0),
                                       jax.device_get(Run(configs[0], devices[:1]).initial_state().params)),
               'mesh': dict(Population(configs, devices).mesh.shape),
               'eval_loop_vs_vmap': eval_loop_vs_vmap(configs, devices[0]),
               'collectives_one_member_per_device': collectives(eight, devices)}, sys.stdout)
