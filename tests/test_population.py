"""Populations: members equal their standalone runs, on one device and with the member axis over 8
devices; configs that cannot share a step are refused before anything is compiled, naming the field."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import tiny_config
from population_runs import TOLERANCE, member_configs
from test_multihost import cli_env

from resnet_jax.errors import ConfigError
from resnet_jax.train.population import check_population

TESTS = Path(__file__).parent


@pytest.fixture(scope='module')
def compared():
    """population_runs.py run once for both comparisons: the standalone runs on one device against the
    population on one device and laid over 8 (LLVM -O0 for both sides, as every CLI test: it compiles ten
    times faster and changes nothing between the sides)."""
    result = subprocess.run([sys.executable, 'population_runs.py'], cwd=TESTS, env=cli_env(8), capture_output=True,
                            text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


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
def test_population_matches_standalone_runs(compared):
    """Two seeds x {ResNet, plain twin} at four learning rates, 3 steps: each member's parameters, batch
    statistics and metrics equal its standalone run's within TOLERANCE, by the vmapped step and by the loop
    over the members (what a population trains with on CPU)."""
    for mode in ('one_device', 'one_device_loop'):
        for i, diff in enumerate(compared[mode]):
            assert diff['variables'] < TOLERANCE and diff['metrics'] < TOLERANCE, (mode, i, diff)
    assert compared['members_differ'] > 1e-2  # the members are not copies of one run
    assert compared['eval_loop_vs_vmap'] < TOLERANCE  # the eval step a population uses on CPU, and elsewhere


@pytest.mark.slow
def test_sharded_population_matches_standalone_runs(compared):
    """The same population on 8 CPU devices (4 member shards x 2 data shards) against the standalone runs on
    one device; and 8 members on 8 devices compile to a step with no collective at all."""
    assert compared['mesh'] == {'member': 4, 'data': 2}
    for i, diff in enumerate(compared['sharded']):
        assert diff['variables'] < TOLERANCE and diff['metrics'] < TOLERANCE, (i, diff)
    assert compared['moved'] > 1e-2, 'training did not change the parameters, so the comparison is vacuous'
    assert compared['collectives_one_member_per_device'] == []


@pytest.mark.parametrize('flags, message', [
    (['--population=1,0'], '--population: 1,0 must be comma-separated positive integers'),
    (['--population=2', '--source=host'], '--population measures the step alone: use --source=synthetic'),
])
def test_bench_population_flag_is_checked(flags, message):
    env = dict(os.environ, PYTHONPATH=str(TESTS.parent) + os.pathsep + os.environ.get('PYTHONPATH', ''))
    result = subprocess.run([sys.executable, '-m', 'resnet_jax.bench', *flags], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode != 0 and f'error: {message}' in result.stderr
