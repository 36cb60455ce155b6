"""Bad configs fail before compilation with a message naming the field and what is allowed."""

from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

from resnet_jax.train import config as config_lib
from resnet_jax.train.config import ConfigError, validate

QUICKSTART = str(Path(__file__).parents[1] / 'experiments' / 'quickstart.py')


def parse(*overrides):
    """The quickstart config with command-line overrides, parsed as the CLI parses them."""
    argv = ['prog', f'--config={QUICKSTART}', *overrides]
    values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file('config', None, 'config', flag_values=values, sys_argv=argv)
    values(argv)
    return holder.value


def test_command_line_overrides_reach_every_level():
    c = parse('--config.optim.lr=0.2', '--config.model.skip=none', '--config.model.stage_sizes=(2,2,2)',
              '--config.mesh.fsdp=2', '--config.batch_size=256', '--config.eval_batch_size=400')
    assert c.optim.lr == 0.2 and c.batch_size == 256 and c.mesh.fsdp == 2
    assert config_lib.model_overrides(c) == {'skip': 'none', 'stage_sizes': (2, 2, 2)}
    validate(c, num_devices=8, num_train=10_000)


def test_unknown_field_fails_at_parse_time_with_a_suggestion():
    with pytest.raises(Exception, match=r'lrr.*Did you mean "lr" instead of "lrr"'):
        parse('--config.optim.lrr=0.2')


def test_wrong_type_fails_at_parse_time():
    with pytest.raises(Exception, match=r"flag --config.batch_size=big: invalid literal for int"):
        parse('--config.batch_size=big')


@pytest.mark.parametrize('overrides, devices, message', [
    (['--config.batch_size=100'], 8, r'config.batch_size: 100 is not divisible by the 8 data shards \(mesh data=8 x fsdp=1\)'),
    (['--config.eval_batch_size=30'], 4, r'config.eval_batch_size: 30 is not divisible by the 4 data shards'),
    (['--config.mesh.fsdp=3'], 8, r'config.mesh.fsdp: 3 must be a positive divisor of the 8 devices'),
    (['--config.mesh.data=4'], 8, r'config.mesh.data: mesh data=4 x fsdp=1 does not fit the 8 devices; use data=-1 or data=8'),
    (['--config.optim.schedule=piecewise', '--config.optim.boundaries=(300,900)'], 1,
     r'config.optim.boundaries: boundary at step 900 is outside the run after warm-up \(51..599\); training has 600 steps'),
    (['--config.optim.schedule=piecewise', '--config.optim.boundary_epochs=(2.0,5.0)'], 1,
     r'boundary at step 781 is outside the run'),  # 5 epochs of 10,000 / 64 = 781.25 steps
    (['--config.optim.warmup_steps=600'], 1, r'config.optim.warmup_steps: warm-up of 600 steps does not end'),
    (['--config.num_epochs=3.0'], 1, r'config.num_steps: set exactly one of num_steps and num_epochs'),
    (['--config.optim.name=adam'], 1, r"config.optim.name: name='adam' is not allowed; choose one of: 'sgd', 'lars', 'adamw'"),
    (['--config.optim.schedule=linear'], 1, r"config.optim.schedule: schedule='linear' is not allowed"),
    (['--config.data.feed=gpu'], 1, r"config.data.feed: feed='gpu' is not allowed; choose one of: 'host', 'device'"),
    (['--config.data.feed=device', '--config.batch_size=10008', '--config.eval_batch_size=8'], 8,
     r"config.batch_size: 10008 exceeds the 10000 examples that data.feed='device' holds over 8 shards"),
    (['--config.data.augment=autoaugment'], 1, r"config.data.augment: augment='autoaugment' is not allowed; choose one of: 'none', 'cifar'"),
    (['--config.mesh.param_rules=((".*","shard"),)'], 1, r"config.mesh.param_rules: param_rules='shard' is not allowed"),
    (['--config.model.name=resnet5O'], 1, r"config.model.name: unknown model 'resnet5O'. Did you mean: .*resnet50"),
    (['--config.model.shortcut=E'], 1, r"config.model: shortcut='E' is not allowed; choose one of: 'A', 'B', 'C', 'D'"),
    (['--config.model.drop_path_rate=1.5'], 1, r'config.model: drop_path_rate=1.5 is outside the allowed range \[0, 1\)'),
    (['--config.log_every_steps=0'], 1, r'config.log_every_steps: must be a positive integer, got 0'),
    (['--config.optim.name=lars', '--config.optim.decay_type=decoupled'], 1,
     r"config.optim.decay_type: LARS applies weight decay inside its trust ratio"),
])
def test_impossible_combinations_name_the_field(overrides, devices, message):
    with pytest.raises(ConfigError, match=message):
        validate(parse(*overrides), num_devices=devices, num_train=10_000)


def test_resolved_config_round_trips_through_json(tmp_path):
    c = parse('--config.model.stage_sizes=(2,2,2)', '--config.mesh.param_rules=((".*kernel","fsdp"),)')
    config_lib.write_resolved(c, str(tmp_path))
    assert config_lib.load_resolved(str(tmp_path)).to_dict() == c.to_dict()
