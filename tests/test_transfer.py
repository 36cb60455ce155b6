"""Transfer learning: frozen parameters, BatchNorm modes, layer-wise lr decay, the head option, the
linear probe (on CIFAR-10 JPEGs from the command line) and the errors for bad fine-tuning configs."""

import os
import shutil
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import cifar10_jpeg, init_variables, tiny_config
from test_multihost import ROOT, cli_env
from test_train import run_module

from resnet_jax import checkpoint
from resnet_jax.errors import ConfigError
from resnet_jax.evaluate import evaluate_workdir
from resnet_jax.models import get_model
from resnet_jax.train import finetune, optim
from resnet_jax.train.config import validate
from resnet_jax.train.loop import train_and_evaluate
from resnet_jax.train.run import Run, restore_workdir

FROZEN = ('params/stem_.*', 'params/stage1_.*')


def flat(tree) -> dict:
    return flax.traverse_util.flatten_dict(jax.device_get(tree), sep='/')


def constant(**overrides):
    """tiny_config with a constant lr, so that a run cut in two has the schedule of a whole one."""
    return tiny_config(**{'optim.schedule': 'constant', **overrides})


def resume_from(workdir, step: int, new, config) -> dict:
    """The final checkpoint of `config` run in `new`, which starts as a copy of `workdir` cut at `step`."""
    (new / 'checkpoints').mkdir(parents=True)
    shutil.copytree(workdir / 'checkpoints' / str(step), new / 'checkpoints' / str(step))
    shutil.copy(workdir / 'config.json', new / 'config.json')
    train_and_evaluate(config, str(new))
    return flat(checkpoint.read_numpy(checkpoint.step_dir(str(new))))


@pytest.fixture(scope='module')
def source(tmp_path_factory):
    """A tiny trained run (10 classes) to fine-tune from."""
    workdir = tmp_path_factory.mktemp('source')
    train_and_evaluate(tiny_config(), str(workdir))
    return workdir


@pytest.mark.slow
def test_frozen_parameters_stay_bit_identical_and_have_no_optimizer_state(source, tmp_path):
    """Stem and stage 1 frozen with their BatchNorms, l2 weight decay on: after 8 steps they and
    their running statistics equal the source bit for bit, the optimizer state has no entry for
    them, everything else changed; and a run cut in two at step 4 ends bit-identical."""
    overrides = {'init.source': f'checkpoint:{source}', 'finetune.freeze': FROZEN,
                 'finetune.freeze_batch_stats': 'frozen', 'checkpoint.every_steps': 4}
    train_and_evaluate(constant(**overrides), str(tmp_path / 'whole'))
    _, restored = restore_workdir(str(tmp_path / 'whole'))
    start = checkpoint.read_numpy(checkpoint.step_dir(str(source)))
    got = flat({'params': restored.state.params, 'batch_stats': restored.state.batch_stats})
    want = flat({'params': start['params'], 'batch_stats': start['batch_stats']})
    frozen = [n for n in got if n.split('/')[1].startswith(('stem_', 'stage1_'))]
    assert len(frozen) == 15  # the stem's conv and norm (3 parameters, 2 statistics), stage 1's (6 and 4)
    for name, value in got.items():
        if name in frozen:
            np.testing.assert_array_equal(value, want[name], err_msg=name)
        else:
            assert not np.array_equal(value, want[name]), f'{name} did not train'
    state_paths = [jax.tree_util.keystr(p, simple=True, separator='/')
                   for p, _ in jax.tree_util.tree_flatten_with_path(restored.state.opt_state)[0]]
    momentum = [p for p in state_paths if '/trace/' in p]
    assert not [p for p in state_paths if '/stem_' in p or '/stage1_' in p], state_paths
    assert len(momentum) == len([n for n in got if n.startswith('params/')]) - 9  # one per trainable parameter

    resumed = resume_from(tmp_path / 'whole', 4, tmp_path / 'resumed', constant(**overrides))
    np.testing.assert_equal(resumed, flat(checkpoint.read_numpy(str(tmp_path / 'whole' / 'checkpoints' / '8'))))


@pytest.mark.slow
def test_batch_norm_modes():
    """Stem and stage 1 frozen. 'frozen': their BatchNorms run in eval mode (statistics unchanged), the
    others use and update batch statistics; 'all': every statistic is unchanged and the train-mode
    forward equals the eval-mode one. Frozen parameters get a zero gradient, the others do not."""
    model = get_model('resnet20', num_classes=10, stage_sizes=(1, 1, 1), widths=(8, 16, 32), stem_width=8)
    x = jax.random.normal(jax.random.key(1), (16, 8, 8, 3))
    variables = init_variables(model, x)  # random running statistics
    weights = jax.random.normal(jax.random.key(2), (16, 10))
    for mode in ('frozen', 'all'):
        apply = finetune.train_apply(model, tiny_config(**{'finetune.freeze': FROZEN, 'finetune.freeze_batch_stats': mode}))

        def loss(params):
            logits, updates = apply(dict(variables, params=params), x, train=True, mutable=['batch_stats'])
            return (logits * weights).sum(), (logits, updates['batch_stats'])

        grads, (logits, stats) = jax.jit(jax.grad(loss, has_aux=True))(variables['params'])
        for name, g in flat(grads).items():
            assert (np.abs(g).max() == 0) == name.startswith(('stem_', 'stage1_')), (mode, name)
        for name, value in flat(stats).items():
            fixed = mode == 'all' or name.startswith(('stem_', 'stage1_'))
            assert np.array_equal(value, flat(variables['batch_stats'])[name]) == fixed, (mode, name)
        eval_logits = model.apply(variables, x, train=False)
        assert np.allclose(logits, eval_logits, rtol=1e-5, atol=1e-5) == (mode == 'all'), mode


def test_layer_lr_decay_gives_each_parameter_its_learning_rate():
    """SGD with momentum on gradients of ones: after 3 steps each parameter has moved by
    decay ** depth times what the head moved, with depth (blocks from the head) written out by hand
    for ResNet-8. With stage 2 frozen and decoupled weight decay on, stage 2 does not move at all."""
    depth = {'head': 0, 'stage3_block0': 1, 'stage2_block0': 2, 'stage1_block0': 3, 'stem_conv': 4, 'stem_norm': 4}
    model = get_model('resnet20', num_classes=10, stage_sizes=(1, 1, 1), widths=(8, 16, 32), stem_width=8)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))['params']

    def moved(**overrides):
        config = tiny_config(**{'optim.schedule': 'constant', 'optim.warmup_steps': 0, 'optim.weight_decay': 0.0,
                                'finetune.layer_lr_decay': 0.5, **overrides})
        tx = optim.make_optimizer(config, num_train=512)
        grads, state, current = jax.tree_util.tree_map(jnp.ones_like, params), tx.init(params), params
        for _ in range(3):
            updates, state = tx.update(grads, state, current)
            current = optax.apply_updates(current, updates)
        return {name: value - flat(params)[name] for name, value in flat(current).items()}

    delta = moved()
    for name, value in delta.items():
        np.testing.assert_allclose(value, delta['head/bias'][0] * 0.5 ** depth[name.split('/')[0]], rtol=1e-5,
                                   err_msg=name)
    delta = moved(**{'finetune.freeze': ('params/stage2_.*',), 'optim.weight_decay': 0.1,
                     'optim.decay_type': 'decoupled'})
    for name, value in delta.items():
        assert (np.abs(value).max() == 0) == name.startswith('stage2_'), name


@pytest.mark.slow
def test_bad_fine_tuning_configs_fail_naming_the_problem(source, monkeypatch):
    """Before any compilation: a freeze pattern that matches nothing names itself and real paths; a
    head of another class count names both shapes and the option; impossible combinations name the field."""
    with pytest.raises(ConfigError, match=r"config.finetune.freeze: 'params/stem' matches no parameter of resnet20\. "
                                          r'Patterns are fullmatched against paths such as params/head/bias.*'
                                          r'the top-level modules are head, stage1_block0, .*stem_conv, stem_norm'):
        validate(tiny_config(**{'finetune.freeze': ('params/stem_.*', 'params/stem')}), 1)
    for overrides, message in [
        ({'finetune.freeze': ('params/.*',)}, r"config.finetune.freeze: \('params/.\*',\) freezes every parameter"),
        ({'finetune.freeze': ('params/stem_conv/.*',), 'finetune.freeze_batch_stats': 'frozen'},
         r"config.finetune.freeze_batch_stats: 'frozen' puts the BatchNorms whose scale and bias are frozen"),
        ({'finetune.freeze_batch_stats': 'some'}, r"config.finetune.freeze_batch_stats: .*'none', 'frozen', 'all'"),
        ({'finetune.layer_lr_decay': 0.0}, r'config.finetune.layer_lr_decay: must be in \(0, 1\]'),
        ({'finetune.linear_probe': True, 'finetune.freeze': FROZEN}, r'config.finetune.freeze: .* does not apply to'),
        ({'init.head': 'new'}, r"config.init.head: head='new' is not allowed; choose one of: 'keep', 'replace'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            validate(tiny_config(**overrides), 1)

    run = Run(tiny_config(**{'data.dataset': 'synthetic', 'model.num_classes': 7, 'init.source': f'checkpoint:{source}'}))
    monkeypatch.setattr(Run, 'initial_state', lambda self: pytest.fail('compiled before the check'))
    with pytest.raises(ConfigError, match=r'config.init.source: checkpoint:.*: its classifier head params/head/bias '
                                          r"has shape \(10,\), and this model \(num_classes=7\) needs \(7,\)\. "
                                          r"Set init.head='replace'"):
        run.first_state()


@pytest.mark.slow
def test_probe_checkpoint_is_the_network_with_its_head_and_resumes(source, tmp_path):
    """A probe's checkpoint evaluated through the whole network (resnet_jax.evaluate) gives the
    probe's own result from cached features, the backbone is the source's, and a probe cut in two
    ends with the head of an uncut one."""
    overrides = {'init.source': f'checkpoint:{source}', 'init.head': 'replace', 'finetune.linear_probe': True,
                 'num_steps': 20, 'log.every_steps': 5, 'eval.every_steps': 20, 'checkpoint.every_steps': 10}
    whole = tmp_path / 'whole'
    final = train_and_evaluate(constant(**overrides), str(whole))
    evaluated = evaluate_workdir(str(whole))
    assert evaluated['evaluate/top1'] == final['eval/top1']
    assert evaluated['evaluate/loss'] == pytest.approx(final['eval/loss'], rel=1e-5)
    probed, start = flat(checkpoint.read_numpy(str(whole / 'checkpoints' / '20'))), checkpoint.read_numpy(
        checkpoint.step_dir(str(source)))
    for name, value in flat({'params': start['params'], 'batch_stats': start['batch_stats']}).items():
        assert np.array_equal(probed[name], value) != name.startswith('params/head/'), name

    np.testing.assert_equal(resume_from(whole, 10, tmp_path / 'resumed', constant(**overrides)), probed)


def small_cifar(root, train_per_class=300, test_per_class=100):
    """The first images of each class of the CIFAR-10 JPEG folder, linked into `root`."""
    original = cifar10_jpeg()
    for split, count in (('train', train_per_class), ('test', test_per_class)):
        for name in sorted(os.listdir(original / split)):
            (root / split / name).mkdir(parents=True)
            for file in sorted(os.listdir(original / split / name))[:count]:
                os.symlink(original / split / name / file, root / split / name / file)
    return root


@pytest.mark.slow
def test_linear_probe_of_a_trained_network_beats_one_of_a_random_network(tmp_path):
    """ResNet-8 (widths 8/16/32) trained for 150 steps on 3,000 CIFAR-10 JPEGs at 16x16, then probed
    from the command line against the same probe on a random network, on 1,000 test images.
    Measured: 35.6% against 27.2% (chance 10%); the 4-point margin is about 3 standard errors."""
    data = small_cifar(tmp_path / 'cifar')
    common = ['-m', 'resnet_jax.train', '--config=experiments/cifar10.py:resnet20', f'--config.data.dataset=folder:{data}',
              '--config.model.stage_sizes=(1,1,1)', '--config.model.widths=(8,16,32)', '--config.model.stem_width=8',
              '--config.data.image_size=16', '--config.batch_size=64', '--config.eval.batch_size=500',
              '--config.optim.boundaries=()', '--config.optim.schedule=cosine', '--config.log.progress_seconds=0',
              '--config.data.validation_split=0']  # all 3,000 training images (the recipe holds out 5,000 of 50k)
    env = cli_env(1)
    trained = run_module([*common, '--config.num_steps=150', '--config.eval.every_steps=150',
                          '--config.checkpoint.every_steps=150', '--config.optim.warmup_steps=10',
                          '--config.optim.weight_decay=5e-4', f'--workdir={tmp_path / "trained"}'], env=env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    probe = [*common, '--config.finetune.linear_probe=True', '--config.init.head=replace', '--config.num_steps=300',
             '--config.eval.every_steps=300', '--config.checkpoint.every_steps=300', '--config.log.every_steps=100',
             '--config.optim.lr=0.5', '--config.optim.weight_decay=0', '--config.optim.warmup_steps=0']
    runs = {name: subprocess.Popen([sys.executable, *probe, *extra, f'--workdir={tmp_path / name}'], cwd=ROOT, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name, extra in (('probe_trained', [f'--config.init.source=checkpoint:{tmp_path / "trained"}']),
                                ('probe_random', []))}
    top1 = {}
    for name, proc in runs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        top1[name] = float(out.strip().splitlines()[-1].split('eval/top1 ')[1].split(',')[0])
    assert top1['probe_trained'] > top1['probe_random'] + 0.04, top1
