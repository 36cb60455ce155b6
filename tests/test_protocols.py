"""Protocol fidelity: each mechanism computes its definition, and each experiment config holds the
recipe of its paper (or of the authors' code where the paper is silent), named in the test."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from helpers import EIGHT_CPU_DEVICES, tiny_config

from resnet_jax.sweep import results
from resnet_jax.data import arrays, augment, pipeline, sources
from resnet_jax.errors import ConfigError
from resnet_jax.models import get_model
from resnet_jax.models.resnet import BatchNorm
from resnet_jax.train import config as config_lib
from resnet_jax.train import optim
from resnet_jax.train.step import preprocess

ROOT = Path(__file__).parents[1]


def experiment(spec: str):
    return config_lib.from_file(str(ROOT / 'experiments' / spec))


# ---- normalisation, padding, validation split -------------------------------------------------

def test_per_pixel_mean_is_the_mean_of_the_training_images_only():
    config = tiny_config(**{'data.normalize': 'per_pixel_mean', 'data.validation_split': 100})
    everything = sources.load(tiny_config(), 'train')
    train_idx, _ = sources.validation_indices(len(everything), 100)
    train = pipeline.open_split(config, 'train')
    mean, std = pipeline.normalization(config, train)
    expected = everything.images[train_idx].astype(np.float64).mean(0) / 255.0
    assert mean.shape == (8, 8, 3) and np.abs(mean - expected).max() < 1e-6 and np.all(std == 1.0)
    batch = {'image': train.images[:4], 'label': train.labels[:4]}
    x, _ = preprocess(jax.random.key(0), batch, tiny_config(**{'data.augment': 'none'}), 4, mean, std)
    np.testing.assert_allclose(x, train.images[:4] / 255.0 - expected, atol=1e-6)


def test_validation_split_is_disjoint_deterministic_and_the_same_for_every_seed():
    train, held_out = sources.validation_indices(50_000, 5_000)
    assert len(held_out) == 5_000 and len(train) == 45_000 and not set(train) & set(held_out)
    assert sorted(np.concatenate([train, held_out]).tolist()) == list(range(50_000))
    np.testing.assert_array_equal(held_out, sources.validation_indices(50_000, 5_000)[1])
    configs = [tiny_config(**{'data.validation_split': 64, 'seed': seed}) for seed in (0, 1)]
    everything = sources.load(tiny_config(), 'train')
    parts = [(pipeline.open_split(c, 'train'), pipeline.open_split(c, 'train', held_out=True)) for c in configs]
    for train_part, val_part in parts:
        assert (len(train_part), len(val_part)) == (512 - 64, 64)
        rows = {x.tobytes() for x in everything.images}
        assert {x.tobytes() for x in train_part.images} | {x.tobytes() for x in val_part.images} == rows
        assert not {x.tobytes() for x in train_part.images} & {x.tobytes() for x in val_part.images}
    np.testing.assert_array_equal(parts[0][1].images, parts[1][1].images)
    with pytest.raises(ValueError, match='validation_split: 512 must be between 1 and 511'):
        sources.validation_indices(512, 512)


def test_held_out_examples_are_evaluated_as_val_beside_eval():
    from resnet_jax.train.run import Run

    run = Run(tiny_config(**{'data.validation_split': 48, 'checkpoint.best_metric': 'val/top1'}))
    metrics = run.evaluate(run.initial_state())
    assert set(metrics) == {f'{p}/{m}' for p in ('eval', 'val') for m in ('top1', 'top5', 'loss')}
    assert len(run.val_data) == 48 and len(run.train_data) == 512 - 48
    assert round(metrics['val/top1'] * 48, 4) == round(metrics['val/top1'] * 48)  # a fraction of the 48


@pytest.mark.parametrize('mode', ['zero', 'reflect'])
def test_crop_padding_equals_numpy_pad_on_host_and_device(mode):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (81, 6, 5, 3), dtype=np.uint8)
    offsets = np.array([(dy, dx) for dy in range(9) for dx in range(9)])
    flips = rng.random(81) < 0.5
    device = np.asarray(augment.cifar_crop_flip(jnp.asarray(images), jnp.asarray(offsets), jnp.asarray(flips), mode))
    numpy_mode = {'zero': 'constant', 'reflect': 'reflect'}[mode]
    for i, ((dy, dx), flip) in enumerate(zip(offsets, flips)):
        padded = np.pad(images[i], [(4, 4), (4, 4), (0, 0)], mode=numpy_mode)
        expected = padded[dy:dy + 6, dx:dx + 5][:, ::-1 if flip else 1]
        np.testing.assert_array_equal(augment.cifar_crop_flip_host(images[i], dy, dx, bool(flip), mode), expected)
        np.testing.assert_array_equal(device[i], expected)


def test_every_feed_crops_with_the_configured_padding():
    """The in-memory feeds' train step and the stream feed's records pass data.pad_mode on."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    config = tiny_config(**{'data.pad_mode': 'reflect'})
    key = jax.random.key(5)
    x, _ = preprocess(key, {'image': images, 'label': np.zeros(4, np.int32)}, config, 4, (0.0,) * 3, (1.0,) * 3)
    np.testing.assert_allclose(x, np.asarray(augment.cifar_augment(key, jnp.asarray(images), 'reflect')) / 255.0,
                               atol=1e-6)
    assert not np.allclose(x, np.asarray(augment.cifar_augment(key, jnp.asarray(images), 'zero')) / 255.0)
    ds = arrays.ArrayDataset(images, np.zeros(4, np.int32), 10)
    record = pipeline.TrainRecord(ds, 4, 4, 0, 'cifar', 8, 'error', seed=0, pad_mode='reflect')
    index = arrays.indices_at(4, 0, np.array([2]))[0]  # element 2: step 0, position 2
    expected = augment.cifar_augment_host(np.random.default_rng([0, 1, 0, 2]), images[index], 'reflect')
    np.testing.assert_array_equal(record(2)['image'], expected)
    zero = augment.cifar_augment_host(np.random.default_rng([0, 1, 0, 2]), images[index], 'zero')
    assert not np.array_equal(expected, zero)  # the draw shows padding, so the mode is seen


def test_pad_after_normalize_pads_with_the_mean():
    config = tiny_config(**{'data.pad_after_normalize': True})
    images = np.full((64, 8, 8, 3), 200, np.uint8)
    mean, std = (0.2, 0.4, 0.6), (0.5, 0.5, 0.5)
    x, _ = preprocess(jax.random.key(3), {'image': images, 'label': np.zeros(64, np.int32)}, config, 4, mean, std)
    inside = (200 / 255 - np.asarray(mean)) / np.asarray(std)
    pixels = np.asarray(x).reshape(-1, 3)
    is_pad = np.all(pixels == 0.0, axis=1)
    assert is_pad.any() and np.allclose(pixels[~is_pad], inside, atol=1e-6)
    black = preprocess(jax.random.key(3), {'image': images, 'label': np.zeros(64, np.int32)}, tiny_config(), 4,
                       mean, std)[0]
    np.testing.assert_allclose(np.asarray(black).reshape(-1, 3)[is_pad], np.broadcast_to(
        -np.asarray(mean) / np.asarray(std), (is_pad.sum(), 3)), atol=1e-6)  # the default pads black


# ---- BatchNorm, head, optimizer -----------------------------------------------------------------

def test_ghost_batchnorm_equals_per_group_statistics_on_8_devices_for_every_mesh():
    env = dict(os.environ, XLA_FLAGS=EIGHT_CPU_DEVICES,
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', ''))
    out = subprocess.run([sys.executable, 'ghost_batchnorm.py'], cwd=ROOT / 'tests', env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    checks = json.loads(out.stdout.strip().splitlines()[-1])
    refused = checks.pop('refused')
    assert 'model.bn_group_size: BatchNorm groups of 4' in refused and 'straddle' in refused
    assert len(checks) == 20
    for key, c in checks.items():
        mesh, group = key.split(',')
        assert c['y'] < 2e-6 and c['mean'] < 1e-6 and c['var'] < 1e-6, (key, c)
        # 8 devices hold 4 examples each: groups of 2 and 4 are normalised with no communication.
        if mesh in ('8x1', '2x4', '4x2') and int(group) <= 4:
            assert not c['collective'], key


@pytest.mark.slow
def test_ghost_batchnorm_in_a_network_is_the_network_on_each_group():
    model = get_model('resnet20', stage_sizes=(1, 1, 1), widths=(4, 8, 8), stem_width=4, bn_group_size=4)
    whole = get_model('resnet20', stage_sizes=(1, 1, 1), widths=(4, 8, 8), stem_width=4)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(12, 8, 8, 3)), jnp.float32)
    variables = jax.jit(model.init)(jax.random.key(0), x[:1])  # compiled once rather than op by op
    train = lambda m: jax.jit(functools.partial(m.apply, train=True, mutable=['batch_stats']))  # noqa: E731
    y, stats = train(model)(variables, x)
    train_whole = train(whole)
    parts = [train_whole(variables, x[i:i + 4]) for i in (0, 4, 8)]
    np.testing.assert_allclose(y, np.concatenate([p[0] for p in parts]), atol=1e-5)
    mean_of_groups = jax.tree_util.tree_map(lambda *s: np.mean(s, 0), *[p[1] for p in parts])
    for a, b in zip(jax.tree_util.tree_leaves(stats), jax.tree_util.tree_leaves(mean_of_groups)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match='a batch of 6 examples does not split into BatchNorm groups of 4'):
        model.apply(variables, x[:6], train=True, mutable=['batch_stats'])


@pytest.mark.parametrize('running_var', ['unbiased', 'biased'])
def test_running_variance_matches_pytorch_or_the_biased_estimate(running_var):
    x = np.random.default_rng(0).normal(2.0, 3.0, (6, 4, 4, 5)).astype(np.float32)
    module = BatchNorm(use_running_average=False, unbiased=running_var == 'unbiased')
    variables = module.init(jax.random.key(0), x)
    y, stats = module.apply(variables, x, mutable=['batch_stats'])
    bn = torch.nn.BatchNorm2d(5)
    expected_y = bn(torch.from_numpy(x.transpose(0, 3, 1, 2))).detach().numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(y, expected_y, atol=1e-5)
    np.testing.assert_allclose(stats['batch_stats']['mean'], bn.running_mean.numpy(), atol=1e-6)
    expected_var = bn.running_var.numpy() if running_var == 'unbiased' else 0.9 + 0.1 * x.var((0, 1, 2))
    np.testing.assert_allclose(stats['batch_stats']['var'], expected_var, rtol=1e-5)
    assert get_model('resnet20').design.bn_running_var == 'unbiased'  # PyTorch's, the default


def test_head_init_normal_001():
    model = get_model('resnet20', widths=(16, 32, 256), num_classes=1000, head_init_std=0.01)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))['params']['head']
    assert abs(float(params['kernel'].std()) - 0.01) < 2e-4 and abs(float(params['kernel'].mean())) < 2e-4
    assert not np.any(params['bias'])
    with pytest.raises(ValueError, match='head_init_std=-1.0 must be >= 0'):
        get_model('resnet20', head_init_std=-1.0)


def test_decay_exclude_names_exactly_the_batchnorm_parameters():
    config = tiny_config(**{'optim.decay_exclude': (r'params/.*norm[0-9]*/(scale|bias)',)})
    config_lib.validate(config, 1)
    params = jax.eval_shape(get_model('resnet20', stage_sizes=(1, 1, 1)).init, jax.random.key(0),
                            jnp.zeros((1, 8, 8, 3)))['params']
    mask = optim.weight_decay_mask(config)(params)
    names = dict(zip(config_lib.finetune.path_names(params), jax.tree_util.tree_leaves(mask)))
    assert names['params/head/bias'] and names['params/head/kernel'] and names['params/stem_conv/kernel']
    assert not names['params/stem_norm/scale'] and not names['params/stage1_block0/norm2/bias']
    assert {n for n, decayed in names.items() if not decayed} == {n for n in names if '_norm/' in n or '/norm' in n}
    with pytest.raises(ConfigError, match="optim.decay_exclude: 'params/bn.*' matches no parameter"):
        config_lib.validate(tiny_config(**{'optim.decay_exclude': ('params/bn.*',)}), 1)


@pytest.mark.parametrize('nesterov', [True, False])
def test_sgd_equals_torch_step_for_step(nesterov):
    """torch.optim.SGD(momentum=0.9, nesterov, weight_decay) with MultiStepLR against make_optimizer on a
    least-squares problem, 20 steps: parameters agree at every step."""
    rng = np.random.default_rng(0)
    data, target = rng.normal(size=(16, 5)), rng.normal(size=(16, 3))
    w0, b0 = rng.normal(size=(5, 3)), rng.normal(size=3)
    config = tiny_config(**{'num_steps': 20, 'optim.warmup_steps': 0, 'optim.schedule': 'piecewise',
                            'optim.boundaries': (6, 13), 'optim.lr': 0.05, 'optim.momentum': 0.9,
                            'optim.nesterov': nesterov, 'optim.weight_decay': 1e-2})
    tx = optim.make_optimizer(config, num_train=1000)
    params = {'kernel': jnp.asarray(w0, jnp.float32), 'bias': jnp.asarray(b0, jnp.float32)}
    opt_state = tx.init(params)
    w, b = torch.tensor(w0, requires_grad=True), torch.tensor(b0, requires_grad=True)
    sgd = torch.optim.SGD([w, b], lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=1e-2)
    lr = torch.optim.lr_scheduler.MultiStepLR(sgd, milestones=[6, 13], gamma=0.1)

    def loss(p):
        return jnp.mean((jnp.asarray(data, jnp.float32) @ p['kernel'] + p['bias'] - target) ** 2)

    for _ in range(20):
        updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
        params = optax.apply_updates(params, updates)
        sgd.zero_grad()
        torch.mean((torch.tensor(data) @ w + b - torch.tensor(target)) ** 2).backward()
        sgd.step()
        lr.step()
        np.testing.assert_allclose(params['kernel'], w.detach().numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(params['bias'], b.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_goyal_warmup_starts_at_the_unscaled_rate():
    config = tiny_config(**{'num_steps': 1000, 'batch_size': 8192, 'optim.scale_lr_by_batch': True,
                            'optim.warmup': 'linear_from_base', 'optim.warmup_steps': 100,
                            'optim.schedule': 'constant'})
    schedule = optim.lr_schedule(config, 1_000_000)
    assert [float(schedule(s)) for s in (0, 50, 100, 500)] == pytest.approx([0.1, 1.65, 3.2, 3.2], rel=1e-5)


# ---- the checks refuse what cannot be computed ------------------------------------------------

@pytest.mark.parametrize('overrides, message', [
    ({'data.normalize': 'per_pixel_mean', 'data.feed': 'stream'}, "data.normalize: 'per_pixel_mean' needs an in-memory"),
    ({'data.pad_after_normalize': True, 'data.feed': 'stream'}, 'data.pad_after_normalize: needs an in-memory feed'),
    ({'data.pad_mode': 'reflect', 'data.augment': 'none'}, "data.pad_mode: pad_mode and pad_after_normalize set"),
    ({'data.pad_mode': 'edge'}, "pad_mode='edge' is not allowed; choose one of: 'zero', 'reflect'"),
    ({'data.normalize': 'per_pixel'}, "normalize='per_pixel' is not allowed"),
    ({'checkpoint.best_metric': 'val/top1'}, 'checkpoint.best_metric: val/top1 needs held-out examples'),
    ({'data.validation_split': -1}, 'data.validation_split: must be >= 0'),
    ({'model.bn_group_size': 5}, 'model.bn_group_size: BatchNorm groups of 5 must split the batch of 32'),
])
def test_protocol_fields_refuse_what_cannot_run(overrides, message):
    with pytest.raises(ConfigError, match=message.replace('(', r'\(')):
        config_lib.validate(tiny_config(**overrides), 1)


# ---- results never select on the test split ---------------------------------------------------

def test_results_select_on_validation_and_never_on_test():
    history = {'eval/top1': [(1, 0.5), (2, 0.9), (3, 0.7)], 'val/top1': [(1, 0.6), (2, 0.5), (3, 0.8)],
               'train/loss': [(1, 2.0), (3, 1.0)], 'eval/loss': [(1, 1.0), (2, 0.5), (3, 0.8)],
               'val/loss': [(1, 0.9), (2, 0.9), (3, 1.1)]}
    assert results.selected(history, 'eval/top1') == (3, 0.7)  # not the test set's best, 0.9 at step 2
    assert results.selected(history, 'eval/loss') == (1, 1.0)  # lowest val loss, the earliest of equals
    assert results.selected(history, 'val/top1') == (3, 0.8)
    assert results.selected(history, 'train/loss') is None
    assert results.selected({'eval/top1': [(1, 0.5)]}, 'eval/top1') is None
    record = {'overrides': {'arg': 'a'}, 'final': {'eval/top1': 0.7}, 'selected': {'eval/top1': 0.7}, 'step': 3,
              'state': 'finished', 'history': history}
    varying, rows = results.summarize([record], ['eval/top1', 'train/loss'])
    header = results.markdown(varying, rows, ['eval/top1', 'train/loss']).splitlines()[0]
    assert header == ('| configuration | runs | eval/top1 error % (final) | eval/top1 error % (at best val/top1) '
                      '| train/loss (final) | steps | state |')
    no_val = dict(record, selected={})
    header = results.markdown(*results.summarize([no_val], ['eval/top1']), ['eval/top1']).splitlines()[0]
    assert header == '| configuration | runs | eval/top1 error % (final) | steps | state |'


# ---- each experiment config holds its paper's recipe ------------------------------------------

def _common_cifar(c, steps=None, epochs=None):
    assert c.batch_size == 128 and c.optim.name == 'sgd' and c.optim.lr == 0.1 and c.optim.momentum == 0.9
    assert c.data.augment == 'cifar' and c.data.image_size == 32 and c.optim.decay_type == 'l2'
    assert c.optim.decay_norm_and_bias and c.optim.decay_exclude == ()  # decay on every parameter
    assert (c.num_steps, c.num_epochs) == (steps, epochs)
    assert c.model.bn_running_var is None  # the default, unbiased: Caffe and (fb.resnet.)torch keep it


def test_cifar10_is_he_et_al_2016_table6():
    """He et al. 2016, Deep Residual Learning, 4.2: batch 128 on 2 GPUs, lr 0.1 /10 at 32k and 48k,
    64k iterations, wd 1e-4, momentum 0.9, per-pixel mean, pad 4 crop and flip, 45k/5k split,
    ResNet-110 warm-up at 0.01 for 400 iterations."""
    c = experiment('cifar10.py:resnet56')
    _common_cifar(c, steps=64_000)
    assert c.optim.boundaries == (32_000, 48_000) and c.optim.decay_factor == 0.1 and not c.optim.nesterov
    assert c.optim.weight_decay == 1e-4 and c.optim.warmup_steps == 0
    assert c.data.normalize == 'per_pixel_mean' and c.data.pad_mode == 'zero' and c.data.pad_after_normalize
    assert c.data.validation_split == 5_000 and c.model.bn_group_size == 64
    c110 = experiment('cifar10.py:resnet110')
    assert (c110.optim.warmup, c110.optim.warmup_steps, c110.optim.warmup_factor) == ('constant', 400, 0.1)


@pytest.mark.parametrize('spec', ['identity_mappings.py:resnet110', 'preact.py:preact_resnet1001'])
def test_identity_mappings_and_preact_are_he_et_al_2016b(spec):
    """He et al. 2016b, Identity Mappings: the ResNet CIFAR schedule, 2 GPUs x 64, lr 0.01 for 400
    iterations on every net; where the paper is silent, the authors' fb.resnet.torch code: per-channel
    mean/std, normalise then zero-pad, Nesterov momentum, all 50k training images."""
    c = experiment(spec)
    _common_cifar(c, steps=64_000)
    assert c.optim.boundaries == (32_000, 48_000) and c.optim.weight_decay == 1e-4 and c.optim.nesterov
    assert (c.optim.warmup, c.optim.warmup_steps, c.optim.warmup_factor) == ('constant', 400, 0.1)
    assert c.data.normalize == 'per_channel' and c.data.mean is None and c.data.pad_mode == 'zero'
    assert c.data.pad_after_normalize and c.data.validation_split == 0 and c.model.bn_group_size == 64


def test_wide_resnet_is_zagoruyko_and_komodakis_2016():
    """Zagoruyko & Komodakis 2016, Wide Residual Networks: Nesterov 0.9, wd 5e-4, batch 128, lr 0.1 x0.2
    at epochs 60/120/160, 200 epochs, per-channel mean/std, reflection padding (the authors' script)."""
    c = experiment('wide_resnet.py:wrn28_10')
    _common_cifar(c, epochs=200.0)
    assert c.optim.nesterov and c.optim.weight_decay == 5e-4 and c.optim.warmup_steps == 0
    assert c.optim.boundary_epochs == (60.0, 120.0, 160.0) and c.optim.decay_factor == 0.2
    assert c.data.normalize == 'per_channel' and c.data.pad_mode == 'reflect' and not c.data.pad_after_normalize
    assert c.data.validation_split == 0 and c.model.bn_group_size == 0


def test_resnext_is_xie_et_al_2017():
    """Xie et al. 2017, ResNeXt CIFAR: batch 128 on 8 GPUs, wd 5e-4, lr 0.1 /10 at epochs 150 and 225,
    300 epochs; the authors' fb.resnet.torch code: Nesterov, per-channel mean/std, then zero padding."""
    c = experiment('resnext.py:resnext29_16x64d')
    _common_cifar(c, epochs=300.0)
    assert c.optim.nesterov and c.optim.weight_decay == 5e-4 and c.optim.warmup_steps == 0
    assert c.optim.boundary_epochs == (150.0, 225.0) and c.optim.decay_factor == 0.1
    assert c.data.normalize == 'per_channel' and c.data.pad_mode == 'zero' and c.data.pad_after_normalize
    assert c.data.validation_split == 0 and c.model.bn_group_size == 16


@pytest.mark.parametrize('hardware, batch', [('gpu1', 256), ('gpu8', 2048), ('gpu32', 8192)])
def test_imagenet_is_goyal_et_al_2017(hardware, batch):
    """Goyal et al. 2017, ImageNet in 1 Hour: lr 0.1 x batch/256, 5-epoch warm-up from 0.1, /10 at epochs
    30/60/80 of 90, momentum 0.9, wd 1e-4 not on BN's gamma and beta, BN over 32 images per GPU at every
    total batch, zero-gamma on the last BN of each branch, classifier ~ N(0, 0.01^2)."""
    c = experiment(f'imagenet.py:resnet50,hardware={hardware}')
    assert c.batch_size == batch and c.optim.lr == 0.1 and c.optim.scale_lr_by_batch and c.num_epochs == 90.0
    assert (c.optim.warmup, c.optim.warmup_epochs) == ('linear_from_base', 5.0) and not c.optim.nesterov
    assert c.optim.boundary_epochs == (30.0, 60.0, 80.0) and c.optim.decay_factor == 0.1 and c.optim.momentum == 0.9
    assert c.optim.weight_decay == 1e-4 and c.optim.decay_norm_and_bias
    assert c.optim.decay_exclude == (r'params/.*norm[0-9]*/(scale|bias)',)
    assert c.model.bn_group_size == 32 and c.model.branch_init == 'zero_gamma' and c.model.head_init_std == 0.01
    assert c.data.augment == 'inception' and c.data.normalize == 'per_channel' and c.data.validation_split == 0
    config_lib.validate(c, 8 if hardware == 'gpu8' else 1)
