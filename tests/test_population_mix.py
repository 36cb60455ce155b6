"""Mixup and CutMix alphas per population member: traced alphas mix each member's batch as its standalone run
does (an alpha of 0: no mixing at all), and a population whose members differ only in their alphas trains
each member as its standalone run."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from population_runs import ALPHAS, TOLERANCE, configs_with_alphas
from test_multihost import cli_env
from test_population import TESTS

from resnet_jax.data import augment
from resnet_jax.train.population import check_population, member_values


def test_traced_alphas_mix_as_the_standalone_calls_do():
    """mix under vmap with each member's alphas as traced scalars equals mix called with Python floats (no
    mixing code at all where both are 0), member by member, on the same keys."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(len(ALPHAS), 6, 8, 8, 3)), jnp.float32)
    targets = jax.nn.one_hot(jnp.asarray(rng.integers(0, 4, (len(ALPHAS), 6))), 4)
    keys = jax.random.split(jax.random.key(3), len(ALPHAS))
    mixup, cutmix = (jnp.asarray(a, jnp.float32) for a in zip(*ALPHAS))
    got = jax.jit(jax.vmap(augment.mix))(keys, x, targets, mixup, cutmix)
    for i, (m, c) in enumerate(ALPHAS):
        want = augment.mix(keys[i], x[i], targets[i], m, c) if m or c else (x[i], targets[i])
        for g, w in zip(got, want):
            np.testing.assert_allclose(g[i], w, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(got[0][2], x[2])  # alphas 0: the batch unchanged, bit for bit
    assert float(jnp.abs(got[0][0] - x[0]).max()) > 1e-2 and float(jnp.abs(got[0][1] - x[1]).max()) > 1e-2


def test_only_alphas_that_differ_are_member_values():
    """Alphas that every member shares stay in the config: the population runs the standalone program."""
    configs = configs_with_alphas(ALPHAS)
    _, model_values = check_population(configs)
    values = member_values(configs, model_values, 512)
    np.testing.assert_array_equal(values['data']['mixup_alpha'], np.float32([0.2, 0.0, 0.0, 0.4]))
    np.testing.assert_array_equal(values['data']['cutmix_alpha'], np.float32([0.0, 1.0, 0.0, 1.0]))
    shared = configs_with_alphas([(0.2, 0.0)] * 4)
    assert member_values(shared, check_population(shared)[1], 512)['data'] == {}


@pytest.mark.slow
def test_population_with_per_member_alphas_matches_standalone_runs():
    """Two seeds x {ResNet, plain twin}, each at its own learning rate and its own alphas (mixup only,
    CutMix only, neither, both), 3 steps: each member equals its standalone run within TOLERANCE (in a
    subprocess at LLVM -O0, as test_population.py's comparisons: it compiles ten times faster)."""
    result = subprocess.run([sys.executable, 'population_runs.py', 'alphas'], cwd=TESTS, env=cli_env(1),
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    for i, diff in enumerate(json.loads(result.stdout.strip().splitlines()[-1])):
        assert diff['variables'] < TOLERANCE and diff['metrics'] < TOLERANCE, (i, diff)
