"""Every experiment file: its default config, every command in its docstring and every sweep it
defines are loaded, validated with the project's checks against the real dataset sizes, and
their models built; parameter counts of a few against the preset table in docs/models.md."""

import re
import shlex
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from absl import flags
from ml_collections import config_flags

from resnet_jax import sweep
from resnet_jax.errors import ConfigError
from resnet_jax.models import get_model, param_count
from resnet_jax.models.registry import model_overrides
from resnet_jax.train import config as config_lib

ROOT = Path(__file__).parents[1]
EXPERIMENTS = sorted((ROOT / 'experiments').glob('*.py'))
# Training-split sizes, so that schedules given in epochs are checked against the real run length.
NUM_TRAIN = {'folder:/tmp/cifar10': 50_000, 'tfds:cifar100': 50_000, 'tfds:imagenet2012': 1_281_167}


def docstring_commands(path: Path) -> list[list[str]]:
    """The resnet_jax.train / resnet_jax.sweep commands of the file's docstring, as argument lists."""
    doc = config_lib.config_module(str(path)).__doc__ or ''
    text = re.sub(r'\\\n\s*', ' ', doc)
    commands = []
    for line in text.splitlines():
        if re.search(r'python -m resnet_jax\.(train|sweep) ', line):
            commands.append(shlex.split(line.split('#')[0]))
    return commands


def check(config, where: str):
    if config.init.source.startswith('torchvision:'):  # weights the user downloads: not on the test machine
        config.init.source = ''
    num_train = NUM_TRAIN.get(config.data.dataset, config.data.num_train)
    try:
        config_lib.validate(config, 1, num_train)
    except ConfigError as e:
        pytest.fail(f'{where}: {e}')


def parse_train_command(args: list[str]):
    """The config `python -m resnet_jax.train <args>` would train, parsed by the same config flags."""
    argv = ['train', *(a.replace('experiments/', f'{ROOT}/experiments/', 1) if a.startswith('--config=') else a
                       for a in args if a.startswith('--config'))]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file('config', None, flag_values=values, sys_argv=argv)
    values(argv)
    return values.config


@pytest.mark.parametrize('path', EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_file(path):
    module = config_lib.config_module(str(path))
    assert module.__doc__ and 'python -m resnet_jax.' in module.__doc__, f'{path.name}: docstring needs the command'
    for what, pattern in [('hardware', r'hardware'), ('expected result', r'expect'),
                          ('wall time', r'\d\s*(min|minutes|h|hours)\b')]:
        assert re.search(pattern, module.__doc__, re.I), f'{path.name}: the docstring must state the {what}'
    check(module.get_config(), f'{path.name}: get_config()')
    commands = docstring_commands(path)
    assert commands, path.name
    for args in commands:
        spec = next(a for a in args if a.startswith('--config=')).split('=', 1)[1]
        assert spec.split(':')[0] == f'experiments/{path.name}', f'{path.name}: {shlex.join(args)}'
        if args[2] == 'resnet_jax.train':
            check(parse_train_command(args[3:]), f'{path.name}: {shlex.join(args)}')
        else:
            common = tuple(a for a in args if a.startswith('--config.'))
            _, runs = sweep.expand(str(ROOT / spec), '/tmp/unused', common)
            for run, config in zip(runs, sweep.validate_runs(runs, check_data=False)):
                check(config, f'{path.name}: sweep {spec}, run {run.name}')
    if hasattr(module, 'get_sweep'):
        _, runs = sweep.expand(str(path), '/tmp/unused')
        assert len(runs) >= 4, f'{path.name}: the default sweep has only {len(runs)} runs'


def sweep_models(spec: str) -> dict[str, tuple[str, dict]]:
    _, runs = sweep.expand(str(ROOT / spec), '/tmp/unused')
    return {run.name: (c.model.name, model_overrides(c))
            for run, c in zip(runs, sweep.validate_runs(runs, check_data=False))}


def count(name: str, overrides: dict, size: int = 32) -> int:
    model = get_model(name, **overrides)
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    return param_count(jax.eval_shape(model.init, jax.random.key(0), x)['params'])


def test_sweeps_build_the_published_models():
    """Parameter counts from the preset table in docs/models.md; the Table 1 variants change exactly what
    their definition says (a 1x1 conv or a gate on every shortcut adds parameters, scaling none)."""
    table6 = sweep_models('experiments/cifar10.py')
    assert sorted(name for name, _ in table6.values()) == sorted(f'{f}{d}' for f in ('plain', 'resnet')
                                                                 for d in (20, 32, 44, 56, 110))
    assert count(*table6['resnet110,seed=0']) == 1_727_962
    table1 = sweep_models('experiments/identity_mappings.py:table1')
    assert len(table1) == 11 and table1['resnet110,skip=identity,seed=0'] == ('resnet110', {'skip': 'identity',
                                                                                        'bn_group_size': 64})
    # A bare 1x1 conv on every shortcut (Fig. 2e): 54 blocks of C x C kernels for C = 16, 32, 64, where
    # the first block of stages 2 and 3 maps C/2 -> C.
    convs = 18 * 16 * 16 + 17 * 32 * 32 + 16 * 32 + 17 * 64 * 64 + 32 * 64
    assert count(*table1['resnet110,skip=conv,seed=0']) == 1_727_962 + convs
    resnet50 = sweep_models('experiments/imagenet.py:hardware=gpu1')['resnet50,hardware=gpu1,seed=0']
    assert count(*resnet50, 64) == 25_557_032
    assert count(*sweep_models('experiments/wide_resnet.py')['wrn28_10,dataset=cifar10,seed=0']) == 36_479_194
    resnext = sweep_models('experiments/resnext.py')['resnext29_8x64d,dataset=cifar100,seed=0']
    assert count(resnext[0], dict(resnext[1], num_classes=10)) == 34_426_698
