"""Schedules, weight decay forms, clipping, LARS/AdamW and the loss against hand computation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import tiny_config

from resnet_jax.train import optim
from resnet_jax.train.step import cross_entropy, preprocess


def schedule(num_train=50_000, **overrides):
    return optim.lr_schedule(tiny_config(**overrides), num_train)


def test_piecewise_schedule_in_steps_and_epochs():
    steps = schedule(**{'num_steps': 64_000, 'batch_size': 128, 'optim.warmup_steps': 0,
                        'optim.schedule': 'piecewise', 'optim.boundaries': (32_000, 48_000)})
    assert [float(steps(s)) for s in (0, 31_999, 32_000, 47_999, 48_000, 63_999)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    # 50,000 examples / batch 125 = 400 steps per epoch: epochs 60 and 120 are steps 24k and 48k.
    epochs = schedule(**{'num_steps': None, 'num_epochs': 200.0, 'batch_size': 125, 'optim.warmup_steps': 0,
                         'optim.schedule': 'piecewise', 'optim.boundary_epochs': (60.0, 120.0),
                         'optim.decay_factor': 0.2})
    assert [float(epochs(s)) for s in (23_999, 24_000, 48_000)] == pytest.approx([0.1, 0.02, 0.004])


def test_warmups_and_the_linear_scaling_rule():
    linear = schedule(**{'num_steps': 1000, 'batch_size': 1024, 'optim.scale_lr_by_batch': True,
                         'optim.warmup_steps': 100, 'optim.schedule': 'constant'})
    assert [float(linear(s)) for s in (0, 50, 100, 500)] == pytest.approx([0.0, 0.2, 0.4, 0.4])
    constant = schedule(**{'num_steps': 1000, 'optim.warmup': 'constant', 'optim.warmup_steps': 400,
                           'optim.schedule': 'piecewise', 'optim.boundaries': (800,)})
    assert [float(constant(s)) for s in (0, 399, 400, 799, 800)] == pytest.approx([0.01, 0.01, 0.1, 0.1, 0.01])
    cosine = schedule(**{'num_steps': 1000, 'optim.warmup_steps': 0, 'optim.schedule': 'cosine'})
    assert [float(cosine(s)) for s in (0, 500, 1000)] == pytest.approx([0.1, 0.05, 0.0], abs=1e-7)


def test_decay_mask_excludes_norms_biases_and_scalars():
    params = {'conv': {'kernel': jnp.ones((3, 3, 2, 2))}, 'norm': {'scale': jnp.ones(2), 'bias': jnp.ones(2)},
              'gain': jnp.ones(()), 'head': {'kernel': jnp.ones((2, 3)), 'bias': jnp.ones(3)}}
    mask = optim.decay_mask(params)
    assert mask == {'conv': {'kernel': True}, 'norm': {'scale': False, 'bias': False}, 'gain': False,
                    'head': {'kernel': True, 'bias': False}}


def run_optimizer(config, params, grads, steps):
    tx = optim.make_optimizer(config, num_train=1000)
    state = tx.init(params)
    for _ in range(steps):
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params


def sgd_config(**overrides):
    return tiny_config(**{'optim.warmup_steps': 0, 'optim.schedule': 'constant', 'optim.lr': 0.1,
                          'optim.momentum': 0.9, 'optim.weight_decay': 0.01, **overrides})


def test_l2_decay_goes_through_momentum_and_decoupled_decay_does_not():
    w0 = {'kernel': jnp.full((2, 2), 2.0), 'bias': jnp.full((2,), 2.0)}
    zero = jax.tree_util.tree_map(jnp.zeros_like, w0)
    lr, wd, mu = 0.1, 0.01, 0.9
    l2 = run_optimizer(sgd_config(), w0, zero, 2)
    w1 = 2.0 - lr * wd * 2.0
    expected_l2 = w1 - lr * (wd * w1 + mu * wd * 2.0)  # momentum carries step 1's decay into step 2
    np.testing.assert_allclose(l2['kernel'], expected_l2, rtol=1e-6)
    np.testing.assert_allclose(l2['bias'], expected_l2, rtol=1e-6)  # decay_norm_and_bias defaults to True
    decoupled = run_optimizer(sgd_config(**{'optim.decay_type': 'decoupled'}), w0, zero, 2)
    np.testing.assert_allclose(decoupled['kernel'], 2.0 * (1 - lr * wd) ** 2, rtol=1e-6)
    masked = run_optimizer(sgd_config(**{'optim.decay_norm_and_bias': False}), w0, zero, 2)
    np.testing.assert_array_equal(masked['bias'], 2.0)
    np.testing.assert_allclose(masked['kernel'], expected_l2, rtol=1e-6)


def test_nesterov_momentum_matches_its_definition():
    w0, g = {'kernel': jnp.zeros((1, 1))}, {'kernel': jnp.ones((1, 1))}
    out = run_optimizer(sgd_config(**{'optim.weight_decay': 0.0, 'optim.nesterov': True}), w0, g, 2)
    # v1 = 1, update1 = g + mu v1 = 1.9; v2 = 1.9, update2 = g + mu v2 = 2.71.
    np.testing.assert_allclose(out['kernel'], -0.1 * (1.9 + 2.71), rtol=1e-6)


def test_gradient_clipping_bounds_the_global_norm():
    w0, g = {'kernel': jnp.zeros((2, 2))}, {'kernel': jnp.full((2, 2), 10.0)}  # norm 20
    out = run_optimizer(sgd_config(**{'optim.weight_decay': 0.0, 'optim.momentum': 0.0,
                                      'optim.grad_clip_norm': 1.0}), w0, g, 1)
    np.testing.assert_allclose(out['kernel'], -0.1 * 0.5, rtol=1e-6)  # each entry 10 * (1 / 20)


def test_adamw_and_lars_take_their_characteristic_steps():
    w0, g = {'kernel': jnp.full((2, 2), 3.0)}, {'kernel': jnp.full((2, 2), 0.5)}
    adam = run_optimizer(sgd_config(**{'optim.name': 'adamw', 'optim.weight_decay': 0.0}), w0, g, 1)
    np.testing.assert_allclose(adam['kernel'], 3.0 - 0.1, rtol=1e-5)  # Adam's first step is lr * sign(g)
    lars = run_optimizer(sgd_config(**{'optim.name': 'lars', 'optim.weight_decay': 0.0, 'optim.momentum': 0.0}),
                         w0, g, 1)
    # The trust ratio rescales the update to trust_coefficient * |w| / |g| * g: |w| = 6, |g| = 1.
    np.testing.assert_allclose(lars['kernel'], 3.0 - 0.1 * 0.001 * 6.0 * 0.5, rtol=1e-5)


def test_label_smoothing_cross_entropy():
    logits = jnp.array([[2.0, 0.0, -1.0]])
    log_p = jax.nn.log_softmax(logits)[0]
    smoothed = -(0.9 + 0.1 / 3) * log_p[0] - (0.1 / 3) * (log_p[1] + log_p[2])
    batch = {'image': np.zeros((1, 2, 2, 3), np.uint8), 'label': np.array([0])}
    config = sgd_config(**{'optim.label_smoothing': 0.1, 'data.augment': 'none'})
    _, targets = preprocess(jax.random.key(0), batch, config, 3, (0.5,) * 3, (0.25,) * 3)
    np.testing.assert_allclose(optax.softmax_cross_entropy(logits, targets)[0], smoothed, rtol=1e-6)
    np.testing.assert_allclose(cross_entropy(logits, jnp.array([0]), 3)[0], -log_p[0], rtol=1e-6)
