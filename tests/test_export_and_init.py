"""Export for inference, evaluation of any kept checkpoint, and warm starts (fine-tuning) from
another run's checkpoint or from torchvision-named weights with a new classifier head."""

import json

import flax
import jax
import numpy as np
import pytest
from helpers import tiny_config
from test_train import run_module

from resnet_jax import checkpoint, export
from resnet_jax.data import augment
from resnet_jax.errors import ConfigError
from resnet_jax.models import get_model
from resnet_jax.train import config as config_lib
from resnet_jax.train.loop import train_and_evaluate
from resnet_jax.train.run import Run


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A tiny run with EMA and checkpoints at steps 4 and 8."""
    workdir = tmp_path_factory.mktemp('run')
    train_and_evaluate(tiny_config(**{'optim.ema_decay': 0.5, 'checkpoint.every_steps': 4}), str(workdir))
    return workdir


def flat(tree) -> dict:
    return flax.traverse_util.flatten_dict(jax.device_get(tree), sep='/')


@pytest.mark.parametrize('ema', [False, True])
@pytest.mark.slow
def test_exported_weights_reproduce_the_checkpoint_logits(trained, tmp_path, ema):
    out = tmp_path / 'model.msgpack'
    result = run_module(['-m', 'resnet_jax.export', f'--workdir={trained}', f'--out={out}', '--step=4',
                         *(['--ema'] if ema else [])])
    assert result.returncode == 0, result.stderr[-3000:]
    model, variables, info = export.load(str(out))
    assert info['step'] == 4 and info['ema'] is ema and info['image_size'] == 8

    run = Run(config_lib.load_resolved(str(trained)))
    manager = checkpoint.Manager(str(trained / 'checkpoints'), run.config, read_only=True)
    state = manager.restore(run.abstract_state, 4).state
    manager.close()
    images = run.eval_data.images[:16]
    expected = run.model.apply({'params': state.ema_params if ema else state.params, 'batch_stats': state.batch_stats},
                               augment.normalize(images, run.mean, run.std), train=False)
    got = model.apply(variables, augment.normalize(images, info['mean'], info['std']), train=False)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    if ema:  # the EMA parameters are not the raw ones, so the flag did something
        assert not np.array_equal(flat(state.ema_params)['head/kernel'], flat(state.params)['head/kernel'])


@pytest.mark.slow
def test_evaluate_reads_an_older_kept_checkpoint(trained):
    result = run_module(['-m', 'resnet_jax.evaluate', f'--workdir={trained}', '--step=4'])
    assert result.returncode == 0, result.stderr[-3000:]
    assert 0 <= json.loads(result.stdout)['evaluate/top1'] <= 1
    missing = run_module(['-m', 'resnet_jax.evaluate', f'--workdir={trained}', '--step=5'])
    assert missing.returncode != 0 and 'has no checkpoint at step 5; it has [4, 8]' in missing.stderr


@pytest.mark.slow
def test_warm_start_from_a_run_with_another_class_count(trained, tmp_path):
    """Shapes (10 classes) -> synthetic data with 7 classes and init.head='replace': every weight but the
    head comes over; without the option the head's shapes are refused."""
    config = tiny_config(**{'data.dataset': 'synthetic', 'model.num_classes': 7,
                            'init.source': f'checkpoint:{trained}', 'num_steps': 4, 'init.head': 'replace'})
    run = Run(config)
    fresh = run.initial_state()
    with pytest.raises(ValueError, match=r'its classifier head params/head/bias has shape \(10,\), and this model '
                                         r"\(num_classes=7\) needs \(7,\)\. Set init.head='replace'"):
        checkpoint.warm_start(config.init.source, run.model, fresh.params, fresh.batch_stats)
    params, stats = checkpoint.warm_start(config.init.source, run.model, fresh.params, fresh.batch_stats, 'replace')
    source = checkpoint.read_numpy(checkpoint.step_dir(str(trained)))
    got, want = flat(params), flat(source['params'])
    assert got['head/kernel'].shape == (32, 7) and want['head/kernel'].shape == (32, 10)
    np.testing.assert_array_equal(got['head/kernel'], flat(fresh.params)['head/kernel'])
    for name, value in got.items():
        if not name.startswith('head/'):
            np.testing.assert_array_equal(value, want[name], err_msg=name)
    for name, value in flat(stats).items():
        np.testing.assert_array_equal(value, flat(source['batch_stats'])[name], err_msg=name)
    train_and_evaluate(config, str(tmp_path))  # and the run itself starts from there


def test_warm_start_from_torchvision_weights(tmp_path):
    """A torch ResNet-20 with 100 classes (random weights and BN statistics), saved as
    safetensors, starts a 10-class model with init.head='replace': the backbone equals the converted
    weights, the head is new."""
    torch = pytest.importorskip('torch')
    from safetensors.torch import save_file

    from resnet_jax.models.torchvision_import import from_torchvision
    from resnet_jax.pytorch.reference import randomize_, reference_resnet

    reference = randomize_(reference_resnet('resnet20', num_classes=100), seed=3)
    path = tmp_path / 'resnet20.safetensors'
    save_file({k: v.contiguous() for k, v in reference.state_dict().items() if v.dtype != torch.int64}, str(path))
    model = get_model('resnet20', num_classes=10)
    fresh = model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
    params, stats = checkpoint.warm_start(f'torchvision:{path}', model, fresh['params'], fresh['batch_stats'], 'replace')
    converted = from_torchvision({k: v.numpy() for k, v in reference.state_dict().items()},
                                 get_model('resnet20', num_classes=100))
    got, want = flat({'params': params, 'batch_stats': stats}), flat(converted)
    for name, value in got.items():
        if '/head/' in name:
            np.testing.assert_array_equal(value, flat(fresh)[name])
        else:
            np.testing.assert_array_equal(value, want[name], err_msg=name)


@pytest.mark.slow
def test_a_warm_start_that_does_not_fit_is_refused(trained):
    config = tiny_config(**{'model.widths': (8, 16, 64), 'init.source': f'checkpoint:{trained}'})
    run = Run(config)
    fresh = run.initial_state()
    with pytest.raises(ValueError, match=r'does not fit this model: params/stage3_block0/conv1/kernel needs \(3, 3, 16, 64\), found \(3, 3, 16, 32\)'):
        checkpoint.warm_start(config.init.source, run.model, fresh.params, fresh.batch_stats)
    with pytest.raises(ConfigError, match='config.init.source: /nonexistent does not exist'):
        config_lib.validate(tiny_config(**{'init.source': 'checkpoint:/nonexistent'}), 1)
