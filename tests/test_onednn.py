"""oneDNN's conv and BatchNorm gradient on CPU (models/onednn.py): what XLA computes, to any order of
differentiation for the conv, in the whole model, and chosen or refused as RESNET_JAX_CPU_CONV says.
The test machines have oneDNN (`.ci/run` installs libdnnl-dev), so these tests require it."""

import functools
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from resnet_jax.models import cpu_conv, onednn, resnet
from resnet_jax.models.resnet import ResNet
from tests.helpers import images

TOL = dict(rtol=1e-5, atol=1e-5)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _onednn(monkeypatch):
    monkeypatch.setenv('RESNET_JAX_CPU_CONV', 'onednn')


def _convs(stride, padding):
    conf = (stride, stride), (padding, padding), (1, 1)

    def ours(x, w):
        return cpu_conv.conv_general_dilated(x, w, conf[0], conf[1], rhs_dilation=conf[2],
                                             dimension_numbers=cpu_conv.NHWC)

    def reference(x, w):
        return lax.conv_general_dilated(x, w, conf[0], conf[1], rhs_dilation=conf[2], dimension_numbers=cpu_conv.NHWC)
    assert cpu_conv.uses_onednn(conf[1])
    return ours, reference


@pytest.mark.parametrize('stride,padding', [(1, (1, 1)), (2, (0, 2))])
def test_second_order_gradients_match_lax(stride, padding):
    """The conv's backward convs have vjps of their own (each other), so grad-of-grad is XLA's."""
    x, w = images((2, 7, 7, 3)), images((3, 3, 3, 4), 1)
    ours, reference = _convs(stride, padding)

    def outer(conv):
        def inner(x, w):
            return jnp.sum(jnp.sin(conv(x, w)))
        gx = lambda x, w: jax.grad(inner, argnums=(0, 1))(x, w)  # noqa: E731
        return jax.grad(lambda x, w: sum(jnp.sum(jnp.cos(g)) for g in gx(x, w)), argnums=(0, 1))

    got = jax.jit(outer(ours))(x, w)
    want = jax.jit(outer(reference))(x, w)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def test_the_conv_really_is_a_onednn_call():
    ours, _ = _convs(1, (1, 1))
    hlo = jax.jit(jax.value_and_grad(lambda x, w: jnp.sin(ours(x, w)).sum(), argnums=(0, 1))).lower(
        images((2, 5, 5, 3)), images((3, 3, 3, 4), 1)).as_text()
    for target in ('conv_forward', 'conv_input_grad', 'conv_weight_grad'):
        assert f'resnet_jax_onednn_{target}' in hlo
    assert 'convolution(' not in hlo
    # not differentiated: XLA's conv, whose rounding is smaller on wide convs
    forward = jax.jit(ours).lower(images((2, 5, 5, 3)), images((3, 3, 3, 4), 1)).as_text()
    assert 'resnet_jax_onednn' not in forward and 'convolution(' in forward


def test_batch_norm_gradient_matches_autodiff():
    """oneDNN's BatchNorm backward against XLA's autodiff of the same forward, with cotangents on the
    statistics too (they are zero in training, but the function must not be wrong where they are not)."""
    x = images((1, 6, 5, 5, 8)) * 3 + 1
    scale, bias = images((8,), 1), images((8,), 2)
    w = [images((1, 6, 5, 5, 8), 3), images((1, 1, 1, 1, 8), 4), images((1, 1, 1, 1, 8), 5)]

    def loss(norm, with_stats):
        def f(x, scale, bias):
            outs = norm(x, scale, bias, 1e-5)
            return sum(jnp.sum(o * v) for o, v in zip(outs, w) if with_stats or o.ndim == x.ndim and o.shape == x.shape)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))

    for with_stats in (False, True):
        got = loss(resnet.batch_norm_onednn_grad, with_stats)(x, scale, bias)
        want = loss(resnet.batch_norm_train, with_stats)(x, scale, bias)
        np.testing.assert_array_equal(got[0], want[0])  # the same forward arithmetic
        for g, r in zip(got[1], want[1]):
            np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def test_eval_step_runs_onednn_forward_convs_and_a_bare_apply_xlas():
    """The evaluation step (train.step.eval_step, what `evaluate` and the training loop run) traces its
    convs inside cpu_conv.onednn_forward, so they are oneDNN's; model.apply alone keeps XLA's convs. Both
    give the same loss and accuracy sums, and logits that agree to float32 rounding."""
    from resnet_jax.train.state import TrainState
    from resnet_jax.train.step import eval_step

    model = ResNet(num_classes=5, stage_sizes=(1, 1, 1), widths=(8, 16, 16), stem='cifar', stem_width=8)
    x = images((6, 8, 8, 3))
    variables = model.init(jax.random.key(0), x)
    state = TrainState(step=0, params=variables['params'], batch_stats=variables['batch_stats'], opt_state=None,
                       ema_params=None)
    batch = {'image': np.asarray(jax.random.randint(jax.random.key(1), (6, 8, 8, 3), 0, 256), np.uint8),
             'label': np.arange(6) % 5, 'mask': np.ones(6, np.float32)}
    step = jax.jit(lambda s, b: eval_step(s, b, model=model, mean=(0.5,) * 3, std=(0.25,) * 3))
    hlo = step.lower(state, batch).as_text()
    assert 'resnet_jax_onednn_conv_forward' in hlo and 'convolution(' not in hlo
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    assert 'resnet_jax_onednn' not in apply.lower(variables, x).as_text()
    with cpu_conv.onednn_forward():
        assert 'resnet_jax_onednn_conv_forward' in jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(
            variables, x).as_text()
    sums = step(state, batch)
    normalized = (batch['image'] / 255.0 - 0.5) / 0.25
    logits = apply(variables, normalized)
    want = -jax.nn.log_softmax(logits)[np.arange(6), batch['label']].sum()
    np.testing.assert_allclose(sums['loss'], want, rtol=1e-5)
    assert float(sums['count']) == 6


def test_model_uses_onednn_and_matches_the_xla_model(monkeypatch):
    """A small ResNet (strided blocks, projection shortcut, 1x1 final map): loss, gradients and the new
    BatchNorm statistics with oneDNN as with XLA's ops."""
    model = ResNet(num_classes=5, stage_sizes=(1, 1, 1), widths=(8, 16, 16), stem='cifar', stem_width=8)
    x = images((4, 4, 4, 3))
    variables = model.init(jax.random.key(0), x)

    def loss(params):
        out, state = model.apply(dict(variables, params=params), x, train=True, mutable=['batch_stats'])
        return (out ** 2).mean(), state

    step = lambda: jax.jit(jax.value_and_grad(loss, has_aux=True))  # noqa: E731
    hlo = step().lower(variables['params']).as_text()
    assert 'resnet_jax_onednn_norm_backward' in hlo and 'resnet_jax_onednn_conv_forward' in hlo
    ours = step()(variables['params'])
    monkeypatch.setenv('RESNET_JAX_CPU_CONV', 'xla')
    assert 'resnet_jax_onednn' not in step().lower(variables['params']).as_text()
    reference = step()(variables['params'])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), ours, reference)


def test_ghost_batch_norm_keeps_xla():
    groups = images((2, 3, 4, 4, 8))
    assert not resnet.norm_by_onednn(groups)
    assert resnet.norm_by_onednn(groups[:1])


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, 'JAX_PLATFORMS': 'cpu', 'RESNET_JAX_CPU_CONV': 'auto', **env}, timeout=300)


CONV = ('import jax.numpy as jnp; from resnet_jax.models import cpu_conv, onednn\n'
        'x = jnp.ones((1, 4, 4, 2)); w = jnp.ones((3, 3, 2, 2))\n'
        'y = cpu_conv.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=cpu_conv.NHWC)\n'
        'print(float(y[0, 1, 1, 0]), onednn.why_not())\n')


def test_kernel_is_built_once_into_the_cache(tmp_path):
    first = _python(CONV, XDG_CACHE_HOME=str(tmp_path), RESNET_JAX_CPU_CONV='onednn')
    assert first.returncode == 0, first.stderr
    assert first.stdout.split() == ['18.0', 'None']
    built = list((tmp_path / 'resnet_jax').glob('onednn_ops-*.so'))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    again = _python(CONV, XDG_CACHE_HOME=str(tmp_path), RESNET_JAX_CPU_CONV='onednn', CXX='/nonexistent/c++')
    assert again.returncode == 0, again.stderr  # the cached library: no compiler needed
    assert built[0].stat().st_mtime_ns == stamp


def test_choices_and_refusals(tmp_path):
    nowhere = dict(XDG_CACHE_HOME=str(tmp_path), ONEDNN_ROOT=str(tmp_path / 'no-onednn'))
    auto = _python(CONV, **nowhere)  # auto: XLA's conv, and the reason is on record
    assert auto.returncode == 0, auto.stderr
    assert auto.stdout.startswith('18.0 oneDNN headers and library not found under')
    demanded = _python(CONV, RESNET_JAX_CPU_CONV='onednn', **nowhere)
    assert demanded.returncode == 1
    assert 'RESNET_JAX_CPU_CONV=onednn but oneDNN cannot be used: oneDNN headers and library not found' in demanded.stderr
    assert 'install libdnnl-dev, or set ONEDNN_ROOT' in demanded.stderr
    typo = _python(CONV, RESNET_JAX_CPU_CONV='onednnn')
    assert typo.returncode == 1
    assert "RESNET_JAX_CPU_CONV='onednnn': allowed values are auto, onednn, xla" in typo.stderr
    broken = _python(CONV, RESNET_JAX_CPU_CONV='onednn', XDG_CACHE_HOME=str(tmp_path), CXX='false')
    assert 'compiling onednn_ops.cc failed' in broken.stderr


ALLOCATOR = ('import json, os, sys; {before}from resnet_jax import allocator\n'
             'print(json.dumps([allocator.keep_freed_memory(), '
             '{{k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}}]))')


@pytest.mark.parametrize('case', ['applies', 'user_set', 'jax_first', 'accelerator'])
def test_allocator_settings(case):
    env, before = {}, ''
    if case == 'user_set':
        env['MALLOC_ARENA_MAX'] = '4'
    elif case == 'jax_first':
        before = 'import jax; '
    elif case == 'accelerator':
        env['JAX_PLATFORMS'] = 'cuda'
    clean = {k: v for k, v in os.environ.items() if not k.startswith('MALLOC_')}
    done = subprocess.run([sys.executable, '-c', ALLOCATOR.format(before=before)], capture_output=True, text=True,
                          cwd=REPO, env={**clean, 'JAX_PLATFORMS': 'cpu', **env}, timeout=120)
    applied, variables = json.loads(done.stdout)
    if case == 'applies':
        assert applied is True
        assert variables == {'MALLOC_ARENA_MAX': '1', 'MALLOC_MMAP_MAX_': '0', 'MALLOC_TRIM_THRESHOLD_': str(2**31 - 1)}
    else:
        assert applied is False
        assert variables == ({'MALLOC_ARENA_MAX': '4'} if case == 'user_set' else {})


FAULTS = ('import resource, sys\n{settings}'
          'import jax, jax.numpy as jnp\n'
          'f = jax.jit(lambda x, w: (jnp.sin(x) @ w).sum())\n'
          'x = jnp.ones((12000, 1000)); w = jnp.ones((1000, 64)); f(x, w).block_until_ready(); f(x, w).block_until_ready()\n'
          'before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n'
          'for _ in range(10): f(x, w).block_until_ready()\n'
          'print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)')


def test_allocator_settings_keep_the_step_memory():
    """What they are for: a jitted computation's temporary buffer (48 MB here, above the largest size
    glibc keeps by default) stops being handed back to the kernel and faulted in again on every call:
    measured 58,700 faults over 5 calls by default, 2-3 with the settings (11,600-23,400 under load)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith('MALLOC_')}
    faults = {}
    for name, settings in (('default', ''), ('kept', 'from resnet_jax import allocator; allocator.keep_freed_memory()\n')):
        done = subprocess.run([sys.executable, '-c', FAULTS.format(settings=settings)], capture_output=True, text=True,
                              cwd=REPO, env={**clean, 'JAX_PLATFORMS': 'cpu'}, timeout=120)
        assert done.returncode == 0, done.stderr
        faults[name] = int(done.stdout)
    assert faults['default'] > 10 * 12000 * 1000 * 4 // 4096 * 0.9, faults  # sin(x), 11,700 pages per call
    assert faults['kept'] < 0.5 * faults['default'], faults  # 2-3 alone; on a loaded machine 1-2 calls' worth


def _optax_update(optimizer, params, opt_state, grads, finite):
    """The train step's update without the CPU's in-place pass: optax's, kept as it was where not finite."""
    updates, new_state = optimizer.update(grads, opt_state, params)
    return jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old),
                                  (optax.apply_updates(params, updates), new_state), (params, opt_state))


@pytest.mark.parametrize('nesterov,weight_decay,decay_exclude', [(False, 5e-4, ()), (True, 5e-4, ('.*head.*',)),
                                                                  (False, 0.0, ())])
def test_sgd_in_place_is_optaxs_update_to_the_bit(nesterov, weight_decay, decay_exclude):
    """optim.sgd_in_place against make_optimizer's update of a real model's parameters (conv kernels
    decayed, BatchNorm and biases not, a decay_exclude pattern, Nesterov, no decay) with momenta and a
    warm-up lr that are not trivial: every parameter, momentum and the step count equal, also where the
    gradient is not finite (nothing moves); one kernel call, and no copy of any parameter."""
    from resnet_jax.train import optim
    from tests.helpers import tiny_config
    config = tiny_config(**{'optim.nesterov': nesterov, 'optim.weight_decay': weight_decay,
                            'optim.decay_exclude': decay_exclude})
    optimizer, schedule = optim.make_optimizer(config, 512), optim.lr_schedule(config, 512)
    rule = optim.in_place_sgd(config, schedule)
    assert rule is not None
    params = resnet.ResNet(stage_sizes=(1, 1), widths=(8, 16), stem_width=8, num_classes=10).init(
        jax.random.key(0), images((1, 8, 8, 3)))['params']
    grads = jax.tree_util.tree_map(lambda p: images(p.shape, 3), params)
    opt_state = optimizer.update(jax.tree_util.tree_map(lambda p: images(p.shape, 4), params),
                                 optimizer.init(params), params)[1]  # momenta set, count 1 (mid warm-up)
    ours = jax.jit(functools.partial(optim.sgd_in_place, rule))
    reference = jax.jit(functools.partial(_optax_update, optimizer))
    for finite in (True, False):
        new, expected = ours(params, opt_state, grads, finite), reference(params, opt_state, grads, finite)
        assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(expected)
        for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(expected)):
            np.testing.assert_array_equal(a, b)
        assert any(not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(new),
                                                            jax.tree_util.tree_leaves((params, opt_state)))) == finite
    hlo = jax.jit(functools.partial(optim.sgd_in_place, rule), donate_argnums=(0, 1)).lower(
        params, opt_state, grads, True).compile().as_text()
    assert hlo.count('custom_call_target="resnet_jax_onednn_sgd_update"') == 1
    assert not re.search(r'f32\[[0-9,]+\]\S* copy\(', hlo)  # the step count (s32[]) may be copied


def test_in_place_sgd_only_for_plain_sgd(monkeypatch):
    """Every other update rule keeps optax's update; so does a run where the kernels are off."""
    from resnet_jax.train import optim
    from tests.helpers import tiny_config
    plain = [{}, {'optim.nesterov': True}, {'optim.decay_type': 'decoupled', 'optim.weight_decay': 0.0},
             {'finetune.freeze_batch_stats': 'all'}]
    other = [{'optim.name': 'adamw'}, {'optim.name': 'lars'}, {'optim.momentum': 0.0}, {'optim.grad_clip_norm': 1.0},
             {'optim.decay_type': 'decoupled'}, {'finetune.freeze': ('params/stem_.*',)},
             {'finetune.linear_probe': True}, {'finetune.layer_lr_decay': 0.5}]
    rules = [optim.in_place_sgd(tiny_config(**o), optax.constant_schedule(0.1)) for o in plain + other]
    assert [r is not None for r in rules] == [True] * len(plain) + [False] * len(other)
    monkeypatch.setenv('RESNET_JAX_CPU_CONV', 'xla')
    assert optim.sgd_in_place(rules[0], {'w': jnp.ones(3)}, None, {'w': jnp.ones(3)}, True) is None


def test_train_step_with_the_in_place_update_is_the_optax_step():
    """Three steps of a real run's compiled train step, with and without the in-place update: the same
    state to the bit; the in-place one calls the kernel and copies no parameter."""
    from resnet_jax import sharding
    from resnet_jax.train import step as step_lib
    from resnet_jax.train.run import Run
    from tests.helpers import tiny_config
    run = Run(tiny_config(**{'optim.nesterov': True}))
    shapes = jax.eval_shape(run.init, jax.random.key(0))
    plain = step_lib.compile_steps(run.model, run.optimizer, run.config, run.mesh, shapes, run.mean, run.std,
                                   run.feed.to_batch)[0]
    batch = sharding.global_batch({'image': run.train_data.images[:32], 'label': run.train_data.labels[:32]}, run.mesh)
    states = []
    for step in (run.train_step, plain):
        state = run.initial_state()
        for _ in range(3):
            state, _ = step(state, batch, jax.random.key(0))
        states.append(jax.tree_util.tree_leaves(jax.device_get(state)))
    for a, b in zip(*states):
        np.testing.assert_array_equal(a, b)
    hlo = run.train_step.lower(run.initial_state(), batch, jax.random.key(0)).compile().as_text()
    assert 'resnet_jax_onednn_sgd_update' in hlo
