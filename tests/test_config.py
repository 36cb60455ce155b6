"""Bad configs fail before compilation with a message naming the field and what is allowed."""

import json
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

from resnet_jax.errors import ConfigError
from resnet_jax.models.registry import model_overrides
from resnet_jax.train import config as config_lib
from resnet_jax.train.config import validate

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
              '--config.mesh.fsdp=2', '--config.batch_size=256', '--config.eval.batch_size=400')
    assert c.optim.lr == 0.2 and c.batch_size == 256 and c.mesh.fsdp == 2
    assert model_overrides(c) == {'skip': 'none', 'stage_sizes': (2, 2, 2)}
    validate(c, num_devices=8, num_train=10_000)


def test_unknown_field_fails_at_parse_time_with_a_suggestion():
    with pytest.raises(Exception, match=r'lrr.*Did you mean "lr" instead of "lrr"'):
        parse('--config.optim.lrr=0.2')


def test_wrong_type_fails_at_parse_time():
    with pytest.raises(Exception, match=r"flag --config.batch_size=big: invalid literal for int"):
        parse('--config.batch_size=big')


@pytest.mark.parametrize('overrides, devices, message', [
    (['--config.batch_size=100'], 8, r'config.batch_size: 100 is not divisible by the 8 data shards \(mesh data=8 x fsdp=1\)'),
    (['--config.eval.batch_size=30'], 4, r'config.eval.batch_size: 30 is not divisible by the 4 data shards'),
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
    (['--config.data.feed=device', '--config.batch_size=10008', '--config.eval.batch_size=8'], 8,
     r"config.batch_size: 10008 exceeds the 10000 examples that data.feed='device' holds over 8 shards"),
    (['--config.data.augment=autoaugment'], 1, r"config.data.augment: augment='autoaugment' is not allowed; choose one of: 'none', 'cifar'"),
    (['--config.mesh.param_rules=((".*","shard"),)'], 1, r"config.mesh.param_rules: param_rules='shard' is not allowed"),
    (['--config.model.name=resnet5O'], 1, r"config.model.name: unknown model 'resnet5O'. Did you mean: .*resnet50"),
    (['--config.model.shortcut=E'], 1, r"config.model: shortcut='E' is not allowed; choose one of: 'A', 'B', 'C', 'D'"),
    (['--config.model.drop_path_rate=1.5'], 1, r'config.model: drop_path_rate=1.5 is outside the allowed range \[0, 1\)'),
    (['--config.log.every_steps=0'], 1, r'config.log.every_steps: must be a positive integer, got 0'),
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


def test_a_workdir_with_the_flat_field_names_of_before_their_sections_is_read_in_todays_names(tmp_path):
    """A run recorded before fields were grouped into log/eval/checkpoint/init (config.RENAMED) still
    evaluates and resumes: its config.json reads as today's config, and check_resume sees no change."""
    c = parse('--config.checkpoint.keep=5', '--config.init.head=replace',
              '--config.checkpoint.resume_allow_changes=("init.source","optim.lr")')
    stored, flat_name = json.loads(config_lib.to_json(c)), {new: old for old, new in config_lib.RENAMED.items()}
    for old, new in config_lib.RENAMED.items():
        section, field = new.split('.')
        stored[old] = stored[section].pop(field)
    allowed = flat_name['checkpoint.resume_allow_changes']
    stored[allowed] = [flat_name.get(name, name) for name in stored[allowed]]  # as an older run named them
    stored = {key: value for key, value in stored.items() if value != {}}
    assert 'log' not in stored and stored[flat_name['checkpoint.keep']] == 5
    (tmp_path / 'config.json').write_text(json.dumps(stored))
    assert config_lib.load_resolved(str(tmp_path)).to_dict() == c.to_dict()
    config_lib.check_resume(stored, c)


@pytest.mark.parametrize('overrides, message', [
    (['--config.optim.lr=-0.1'], r'config.optim.lr: must be > 0, got -0.1'),
    (['--config.optim.lr=0.0'], r'config.optim.lr: must be > 0, got 0.0'),
    (['--config.optim.lr=nan'], r'config.optim.lr: must be a finite number, got nan'),
    (['--config.optim.momentum=1.5'], r'config.optim.momentum: must be in \[0, 1\), got 1.5'),
    (['--config.optim.weight_decay=-1e-4'], r'config.optim.weight_decay: must be >= 0, got -0.0001'),
    (['--config.optim.label_smoothing=1.5'], r'config.optim.label_smoothing: must be in \[0, 1\), got 1.5'),
    (['--config.optim.ema_decay=2.0'], r'config.optim.ema_decay: must be in \[0, 1\), got 2.0'),
    (['--config.optim.decay_factor=0.0'], r'config.optim.decay_factor: must be > 0, got 0.0'),
    (['--config.optim.grad_clip_norm=-1.0'], r'config.optim.grad_clip_norm: must be >= 0, got -1.0'),
    (['--config.optim.warmup_steps=-5'], r'config.optim.warmup_steps: must be >= 0, got -5'),
    (['--config.optim.boundaries=(400,200)'], r'config.optim.boundaries: must be strictly increasing, got \(400, 200\)'),
    (['--config.num_steps=0'], r'config.num_steps: must be a positive integer, got 0'),
    (['--config.seed=-1'], r'config.seed: must be in \[0, 2147483648\), got -1'),
    (['--config.data.cutmix_alpha=-1.0'], r'config.data.cutmix_alpha: must be >= 0, got -1.0'),
    (['--config.data.mean=(0.5,0.5,0.5)', '--config.data.std=(0.2,0.0,0.2)'],
     r'config.data.std: must be > 0, got \(0.2, 0.0, 0.2\)'),
    (['--config.model.num_classes=1'], r'config.model.num_classes: must be >= 2, got 1'),
    (['--config.model.se_ratio=nan'], r'config.model.se_ratio: must be a finite number, got nan'),
    (['--config.eval.every_steps=0'], r'config.eval.every_steps: must be a positive integer, got 0'),
    (['--config.checkpoint.resume_allow_changes=("optim.lr","optim.wieght_decay")'],
     r"config.checkpoint.resume_allow_changes: 'optim.wieght_decay' is not a config field. Did you mean: optim.weight_decay, "),
])
def test_values_outside_their_range_name_the_field_and_the_range(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(parse(*overrides), num_devices=1)


def test_zero_epochs_is_refused():
    c = parse('--config.num_epochs=0.0')
    c.num_steps = None
    with pytest.raises(ConfigError, match=r'config.num_epochs: must be > 0, got 0.0'):
        validate(c, num_devices=1)


def test_config_files_that_cannot_give_a_config_are_named(tmp_path):
    (tmp_path / 'none.py').write_text('X = 1\n')
    (tmp_path / 'needs.py').write_text('def get_config(arg):\n    raise ValueError(f"{arg!r}: use a or b")\n')
    (tmp_path / 'broken.py').write_text('def get_config(:\n')
    for spec, message in [
        (f'{QUICKSTART}:resnet56', r"quickstart.py: get_config\(\) takes no argument, and .* gives it 'resnet56'"),
        (f'{tmp_path}/none.py', r'none.py defines no get_config\(\)'),
        (f'{tmp_path}/needs.py', r'needs.py: get_config\(arg\) needs an argument: --config=.*needs.py:<arg>'),
        (f'{tmp_path}/needs.py:c', r"needs.py: get_config\('c'\) failed: 'c': use a or b"),
        (f'{tmp_path}/broken.py', r'broken.py \(line 1\) fails to load: SyntaxError'),
        (f'{tmp_path}/missing.py', r'config file .*missing.py does not exist'),
    ]:
        with pytest.raises(ConfigError, match=message):
            config_lib.from_file(spec)
    with pytest.raises(ConfigError, match=r"--config.optim.lrr: config.optim has no field 'lrr'. Did you mean: lr\?"):
        config_lib.check_config_args([f'--config={QUICKSTART}', '--config.optim.lr=1', '--config.optim.lrr=1'])
    with pytest.raises(ConfigError, match=r"--config.optimm.lr: the config has no field 'optimm'. Did you mean: optim\?"):
        config_lib.check_config_args(['--config', QUICKSTART, '--config.optimm.lr=1'])
