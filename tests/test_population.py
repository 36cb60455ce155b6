"""Populations: members equal their standalone runs, on one device and with the member axis over 8
devices; configs that cannot share a step are refused before anything is compiled, naming the field."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from helpers import tiny_config
from population_runs import (
    differences,
    member_configs,
    train_population,
    train_standalone,
)

from resnet_jax.errors import ConfigError
from resnet_jax.train.population import check_population

TESTS = Path(__file__).parent
# Members run the same arithmetic as their standalone runs, with the member axis batched into the
# convolutions (grouped) and reductions: float32 summation order differs, by ~1e-7 on parameters, batch
# statistics and metrics of order 0.1-3 after 3 steps. 1e-5 absolute bounds that with room, and is far below
# what one step moves (the test checks that the parameters moved by more than 1e-2).
TOLERANCE = 1e-5


@pytest.mark.parametrize('field, override', [
    ('model.stage_sizes', {'model.stage_sizes': (2, 2, 2)}),  # another depth
    ('model.shortcut', {'model.shortcut': 'B'}),  # a projection shortcut beside option A
    ('batch_size', {'batch_size': 16}),
    ('data.dataset', {'data.dataset': 'shapes'}),
    ('optim.schedule', {'optim.schedule': 'piecewise'}),
    ('num_steps', {'num_steps': 16}),
])
def test_mixed_population_is_refused_naming_the_field(field, override):
    configs = member_configs()
    configs.append(tiny_config(**{'data.dataset': 'synthetic', 'batch_size': 8, **override}))
    with pytest.raises(ConfigError, match=f'config.{field}: differs between the members'):
        check_population(configs)


def test_plain_twin_needs_option_a_shortcuts():
    """A plain net whose shortcuts would project has none of its twin's projection weights."""
    configs = [tiny_config(**{'model.name': name, 'model.shortcut': 'B'}) for name in ('resnet20', 'plain20')]
    with pytest.raises(ConfigError, match="config.model.skip: differs .*'identity' in member 0, 'none' in member 1"):
        check_population(configs)


def test_what_may_differ_is_a_member_value():
    configs = member_configs()
    configs[1].optim.momentum, configs[2].optim.warmup_steps = 0.5, 3
    configs[3].model.dropout_rate = 0.25
    model, values = check_population(configs)
    assert model.design.skip == 'identity' and model.design.dropout_rate == 0.0
    assert [v['skip_gain'] for v in values] == [1.0, 0.0, 1.0, 0.0]
    assert [v['dropout_rate'] for v in values] == [0.0, 0.0, 0.0, 0.25]
    assert all('drop_path_rate' not in v for v in values)  # the same in every member: left in the design


def test_values_every_member_shares_stay_in_the_design():
    configs = [tiny_config(**{'model.name': 'plain20', 'seed': seed, 'model.drop_path_rate': 0.1}) for seed in (0, 1)]
    model, values = check_population(configs)
    assert model.design.skip == 'none' and model.design.drop_path_rate == 0.1 and values == [{}, {}]


@pytest.mark.slow
def test_population_matches_standalone_runs():
    """Two seeds x {ResNet, plain twin} at four learning rates, 3 steps: each member's parameters, batch
    statistics and metrics equal its standalone run's within TOLERANCE."""
    configs = member_configs()
    device = jax.devices()[0]
    population = train_population(configs, [device])
    standalone = [train_standalone(c, device) for c in configs]
    for i, diff in enumerate(differences(population, standalone)):
        assert diff['variables'] < TOLERANCE and diff['metrics'] < TOLERANCE, (i, diff)
    kernels = population[0]['params']['head']['kernel']
    assert float(abs(kernels[0] - kernels[2]).max()) > 1e-2  # the members are not copies of one run


@pytest.mark.slow
def test_sharded_population_matches_standalone_runs():
    """The same population on 8 CPU devices (4 member shards x 2 data shards) against the standalone runs on
    one device; and 8 members on 8 devices compile to a step with no collective at all."""
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8')
    env['PYTHONPATH'] = str(TESTS.parent) + os.pathsep + env.get('PYTHONPATH', '')
    result = subprocess.run([sys.executable, 'population_runs.py'], cwd=TESTS, env=env, capture_output=True,
                            text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out['mesh'] == {'member': 4, 'data': 2}
    for i, diff in enumerate(out['differences']):
        assert diff['variables'] < TOLERANCE and diff['metrics'] < TOLERANCE, (i, diff)
    assert out['moved'] > 1e-2, 'training did not change the parameters, so the comparison is vacuous'
    assert out['collectives_one_member_per_device'] == []


@pytest.mark.parametrize('flags, message', [
    (['--population=1,0'], '--population: 1,0 must be comma-separated positive integers'),
    (['--population=2', '--source=host'], '--population measures the step alone: use --source=synthetic'),
])
def test_bench_population_flag_is_checked(flags, message):
    env = dict(os.environ, PYTHONPATH=str(TESTS.parent) + os.pathsep + os.environ.get('PYTHONPATH', ''))
    result = subprocess.run([sys.executable, '-m', 'resnet_jax.bench', *flags], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode != 0 and f'error: {message}' in result.stderr
