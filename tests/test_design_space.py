"""Each design-space option checked against its defining property.

Blocks are compared with hand-written definitions built from jax.lax primitives (not from
the module's own helpers), on small odd-sized inputs, in eval mode with random BatchNorm
statistics so that normalisation is not the identity.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from helpers import images, init_variables, sown

from resnet_jax.models import (
    BlockDesign,
    ResidualBlock,
    get_model,
    param_count,
    residual_stream,
)
from resnet_jax.models.design import MEMBER_FIELDS, split_member
from resnet_jax.models.resnet import SqueezeExcite

TOL = dict(rtol=1e-5, atol=1e-5)


def conv_ref(x, kernel, stride=1, bias=None, groups=1):
    pad = (kernel.shape[0] - 1) // 2
    y = jax.lax.conv_general_dilated(x, kernel, (stride, stride), [(pad, pad)] * 2,
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=groups)
    return y if bias is None else y + bias


def bn_ref(x, params, stats):
    return (x - stats['mean']) / jnp.sqrt(stats['var'] + 1e-5) * params['scale'] + params['bias']


def block_variables(design, x, planes, stride=1, seed=0, **fields):
    block = ResidualBlock(planes, stride, design, **fields)
    return block, init_variables(block, x, seed)


def shapes(model, x):
    """Variable shapes without running the initialisers, for tests about structure."""
    return jax.eval_shape(model.init, jax.random.key(0), x)


def flat_names(tree):
    return {'/'.join(k) for k in traverse_util.flatten_dict(tree)}


def blocks_with(variables, leaf):
    return {path.split('/')[0] for path in flat_names(variables['params']) if f'/{leaf}/' in path}


# --- Where BN and ReLU sit: Identity Mappings, Table 2 / Figure 4 ----------------------------

DEFINITIONS = {
    'post': lambda x, c1, c2, b1, b2, a: a(x + b2(c2(a(b1(c1(x)))))),
    'bn_after_add': lambda x, c1, c2, b1, b2, a: a(b2(x + c2(a(b1(c1(x)))))),
    'relu_before_add': lambda x, c1, c2, b1, b2, a: x + a(b2(c2(a(b1(c1(x)))))),
    'relu_preact': lambda x, c1, c2, b1, b2, a: x + b2(c2(a(b1(c1(a(x)))))),
    'preact': lambda x, c1, c2, b1, b2, a: x + c2(a(b2(c1(a(b1(x)))))),
}


@pytest.mark.parametrize('placement', sorted(DEFINITIONS))
@pytest.mark.parametrize('activation, act_ref', [('relu', jax.nn.relu), ('silu', jax.nn.silu)])
def test_activation_placement_matches_its_definition(placement, activation, act_ref):
    x = images((2, 7, 7, 8))
    block, v = block_variables(BlockDesign(placement=placement, activation=activation), x, planes=8)
    p, s = v['params'], v['batch_stats']
    expected = DEFINITIONS[placement](
        x, lambda h: conv_ref(h, p['conv1']['kernel']), lambda h: conv_ref(h, p['conv2']['kernel']),
        lambda h: bn_ref(h, p['norm1'], s['norm1']), lambda h: bn_ref(h, p['norm2'], s['norm2']), act_ref)
    np.testing.assert_allclose(block.apply(v, x), expected, **TOL)


def test_bottleneck_preact_matches_its_definition_with_projection_from_the_preactivated_input():
    x = images((2, 9, 9, 8))
    design = BlockDesign(block='bottleneck', placement='preact')
    block, v = block_variables(design, x, planes=4, stride=2)
    p, s = v['params'], v['batch_stats']
    pre = jax.nn.relu(bn_ref(x, p['norm1'], s['norm1']))
    h = conv_ref(pre, p['conv1']['kernel'])
    h = conv_ref(jax.nn.relu(bn_ref(h, p['norm2'], s['norm2'])), p['conv2']['kernel'], stride=2)
    h = conv_ref(jax.nn.relu(bn_ref(h, p['norm3'], s['norm3'])), p['conv3']['kernel'])
    shortcut = conv_ref(pre, p['shortcut_conv']['kernel'], stride=2)  # bare conv, no norm
    assert 'shortcut_norm' not in p
    np.testing.assert_allclose(block.apply(v, x), shortcut + h, **TOL)


# --- Shortcut types A/B/C/D ------------------------------------------------------------------

def test_option_a_subsamples_and_zero_pads_without_parameters():
    x = images((2, 9, 9, 16))
    block, v = block_variables(BlockDesign(shortcut='A'), x, planes=32, stride=2)
    _, inter = sown(block, v, x)
    shortcut = inter['shortcut'][0]
    assert shortcut.shape == (2, 5, 5, 32)
    np.testing.assert_array_equal(shortcut[..., :16], x[:, ::2, ::2, :])
    np.testing.assert_array_equal(shortcut[..., 16:], 0)
    assert not any('shortcut' in name for name in flat_names(v['params']))


def test_option_b_projects_only_where_the_shape_changes_and_c_everywhere():
    x = images((1, 8, 8, 3))
    b = shapes(get_model('resnet20', shortcut='B'), x)
    assert blocks_with(b, 'shortcut_conv') == {'stage2_block0', 'stage3_block0'}
    assert blocks_with(b, 'shortcut_norm') == {'stage2_block0', 'stage3_block0'}
    c = shapes(get_model('resnet20', shortcut='C'), x)
    every_block = {f'stage{s}_block{i}' for s in (1, 2, 3) for i in range(3)}
    assert blocks_with(c, 'shortcut_conv') == every_block == blocks_with(c, 'shortcut_norm')


def avg_pool_ceil_ref(x):
    """2x2/2 average over the cells that exist: odd trailing rows/columns average fewer."""
    n, h, w, c = x.shape
    out = np.zeros((n, -(-h // 2), -(-w // 2), c), np.float32)
    for i in range(out.shape[1]):
        for j in range(out.shape[2]):
            out[:, i, j] = np.asarray(x)[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean(axis=(1, 2))
    return out


def test_option_d_average_pools_then_projects():
    x = images((2, 9, 9, 8))
    block, v = block_variables(BlockDesign(block='bottleneck', shortcut='D'), x, planes=4, stride=2)
    _, inter = sown(block, v, x)
    p, s = v['params'], v['batch_stats']
    expected = bn_ref(conv_ref(avg_pool_ceil_ref(x), p['shortcut_conv']['kernel']), p['shortcut_norm'],
                      s['shortcut_norm'])
    np.testing.assert_allclose(inter['shortcut'][0], expected, **TOL)


# --- The skip path: Identity Mappings, Table 1 -----------------------------------------------

def logits(model, variables, x):
    return model.apply(variables, x, train=False)


def test_no_skip_is_a_plain_net_with_no_addition():
    x = images((2, 9, 9, 3))
    model = get_model('resnet20', skip='none')
    v = init_variables(model, x)
    _, inter = sown(model, v, x)
    for name in model.block_names:
        assert 'shortcut' not in inter[name]
        np.testing.assert_array_equal(inter[name]['output'][0], jax.nn.relu(inter[name]['branch'][0]))
    assert param_count(v['params']) == param_count(shapes(get_model('resnet20'), x)['params'])


def test_constant_scaling_zero_on_the_shortcut_is_the_plain_net():
    x = images((2, 9, 9, 3))
    scaled = get_model('resnet20', skip='scale', skip_scale=0.0)
    v = init_variables(scaled, x)
    np.testing.assert_allclose(logits(scaled, v, x), logits(get_model('plain20'), v, x), **TOL)
    half = get_model('resnet20', skip='scale', skip_scale=0.5, branch_scale=0.5)
    _, inter = sown(half, v, x)
    for name in half.block_names:
        block = inter[name]
        expected = jax.nn.relu(0.5 * block['shortcut'][0] + block['branch'][0])  # 'branch' is already scaled
        np.testing.assert_allclose(block['output'][0], expected, **TOL)
    _, unscaled = sown(get_model('resnet20'), v, x)
    np.testing.assert_allclose(inter['stage1_block0']['branch'][0],
                               0.5 * unscaled['stage1_block0']['branch'][0], **TOL)


def edit_params(variables, match, fn=None):
    """Drop every parameter whose path satisfies `match`, or replace it by `fn(value)`."""
    flat = traverse_util.flatten_dict(variables['params'])
    kept = {k: fn(v) if fn else None for k, v in flat.items() if match(k)}
    flat = {k: kept.get(k, v) for k, v in flat.items()}
    return dict(variables, params=traverse_util.unflatten_dict({k: v for k, v in flat.items() if v is not None}))


def is_gate(path):
    return 'gate' in path


@pytest.mark.parametrize('skip', ['exclusive_gate', 'shortcut_gate'])
def test_gates_interpolate_between_the_residual_and_the_plain_net(skip):
    x = images((2, 9, 9, 3))
    closed = get_model('resnet20', skip=skip, gate_bias_init=-30.0)  # g ~ 0: shortcut fully open
    v = init_variables(closed, x)
    gate = v['params']['stage1_block0']['gate']
    assert gate['kernel'].shape == (1, 1, 16, 16)
    np.testing.assert_array_equal(gate['bias'], -30.0)
    opened = get_model('resnet20', skip=skip, gate_bias_init=30.0)  # g ~ 1: shortcut closed
    v_open = edit_params(v, lambda path: path[-2:] == ('gate', 'bias'), lambda bias: -bias)
    if skip == 'exclusive_gate':
        # (1 - g) x + g F(x): with g ~ 0 each block passes its shortcut through untouched.
        _, inter = sown(closed, v, x)
        for name in closed.block_names:
            np.testing.assert_allclose(inter[name]['output'][0], jax.nn.relu(inter[name]['shortcut'][0]), **TOL)
    else:
        # (1 - g) x + F(x): with g ~ 0 it is the ordinary residual net.
        np.testing.assert_allclose(logits(closed, v, x), logits(get_model('resnet20'), edit_params(v, is_gate), x), **TOL)
    # With g ~ 1 both gates shut the shortcut: the plain net.
    np.testing.assert_allclose(logits(opened, v_open, x), logits(get_model('plain20'), edit_params(v, is_gate), x), **TOL)


def test_conv_skip_puts_a_bare_1x1_conv_on_every_shortcut():
    x = images((2, 9, 9, 16))
    block, v = block_variables(BlockDesign(skip='conv'), x, planes=16)
    _, inter = sown(block, v, x)
    assert 'shortcut_norm' not in v['params']
    np.testing.assert_allclose(inter['shortcut'][0], conv_ref(x, v['params']['shortcut_conv']['kernel']), **TOL)
    model = get_model('resnet20', skip='conv')
    assert blocks_with(shapes(model, images((1, 8, 8, 3))), 'shortcut_conv') == set(model.block_names)


def test_dropout_on_the_shortcut():
    x = images((2, 9, 9, 3))
    model = get_model('resnet20', skip='dropout', skip_dropout=0.5)
    v = init_variables(model, x)
    np.testing.assert_allclose(logits(model, v, x), logits(get_model('resnet20'), v, x), **TOL)  # eval: identity
    block = ResidualBlock(16, 1, BlockDesign(skip='dropout', skip_dropout=0.25, branch_init='zero_gamma'))
    h = jnp.abs(images((4, 16, 16, 16))) + 0.1
    bv = block.init(jax.random.key(0), h)
    out, _ = block.apply(bv, h, train=True, rngs={'dropout': jax.random.key(3)}, mutable=['batch_stats'])
    kept = np.asarray(out) != 0  # the branch is zero at init, so the output is the dropped shortcut
    assert 0.70 < kept.mean() < 0.80
    np.testing.assert_allclose(np.asarray(out)[kept], np.asarray(h)[kept] / 0.75, rtol=1e-6)


# --- Branch initialisation -------------------------------------------------------------------

@pytest.mark.parametrize('name, overrides', [
    ('resnet20', dict(branch_init='zero_gamma')),
    ('preact_resnet110', dict(branch_init='zero_gamma', stage_sizes=(2, 2, 2))),
    ('resnet50', dict(branch_init='zero_gamma', stage_sizes=(1, 2, 1, 1))),
    ('resnet20', dict(branch_init='zero_gamma', placement='relu_before_add')),
    ('resnet20', dict(branch_init='skipinit')),
    ('resnet20', dict(branch_init='skipinit', norm='none')),
    ('resnet20', dict(branch_init='fixup', norm='none')),
])
def test_identity_at_init_makes_every_block_its_shortcut(name, overrides):
    model = get_model(name, **overrides)
    x = images((2, 35, 35, 3))
    v = model.init(jax.random.key(0), x)
    out, inter = sown(model, v, x)
    for block in model.block_names:
        shortcut = inter[block]['shortcut'][0]
        np.testing.assert_array_equal(inter[block]['branch'][0], 0)
        expected = shortcut if model.design.preact or model.design.placement == 'relu_before_add' else jax.nn.relu(shortcut)
        np.testing.assert_allclose(inter[block]['output'][0], expected, **TOL)
    if model.design.branch_init == 'fixup':
        np.testing.assert_array_equal(out, 0)  # Fixup also zero-initialises the classifier


def test_zero_gamma_zeroes_the_last_norm_scale_or_else_the_last_conv():
    x = images((1, 8, 8, 3))
    post = init_variables(get_model('resnet20', branch_init='zero_gamma'), x)['params']['stage1_block0']
    np.testing.assert_array_equal(post['norm2']['scale'], 0)
    assert np.all(post['norm1']['scale'] == 1) and np.any(post['conv2']['kernel'] != 0)
    pre = init_variables(get_model('preact_resnet110', branch_init='zero_gamma'), x)['params']['stage1_block0']
    np.testing.assert_array_equal(pre['conv2']['kernel'], 0)


def test_skipinit_gain_scales_the_branch():
    x = images((2, 9, 9, 3))
    model = get_model('resnet20', branch_init='skipinit')
    v = init_variables(model, x)
    assert v['params']['stage1_block0']['branch_gain'].shape == ()
    is_gain = lambda path: path[-1] == 'branch_gain'  # noqa: E731
    ones = edit_params(v, is_gain, jnp.ones_like)
    np.testing.assert_allclose(logits(model, ones, x), logits(get_model('resnet20'), edit_params(v, is_gain), x), **TOL)


def test_fixup_scalars_and_scaled_init():
    x = images((1, 8, 8, 3))
    model = get_model('resnet110', branch_init='fixup', norm='none')
    p = model.init(jax.random.key(0), x)['params']
    assert 'batch_stats' not in model.init(jax.random.key(0), x)
    assert set(p['stage1_block0']) == {'bias1a', 'bias1b', 'bias2a', 'bias2b', 'scale', 'conv1', 'conv2'}
    np.testing.assert_array_equal(p['stage2_block3']['conv2']['kernel'], 0)
    np.testing.assert_array_equal(p['head']['kernel'], 0)
    # conv1 is He-initialised and scaled by L^(-1/(2m-2)) = 54^(-1/2) for two-conv branches.
    fixup_std = np.std(np.concatenate([np.ravel(p[b]['conv1']['kernel']) for b in model.block_names[36:]]))
    he_std = np.sqrt(2.0 / (9 * 64))
    assert fixup_std == pytest.approx(he_std / np.sqrt(54), rel=0.05)


# --- Stochastic depth, dropout, squeeze-excitation, norms, dtype ------------------------------

@pytest.mark.slow
def test_drop_path_drops_whole_branches_per_sample_with_the_linear_rule():
    model = get_model('resnet20', drop_path_rate=0.5)
    x = images((1000, 4, 4, 3))
    v = model.init(jax.random.key(0), x[:1])
    _, inter = sown(model, v, x, train=True, rngs={'dropout': jax.random.key(1)})
    for index, name in enumerate(model.block_names, start=1):
        branch = np.asarray(inter[name]['branch'][0]).reshape(1000, -1)
        dropped = np.all(branch == 0, axis=1)
        assert np.all(dropped | np.all(branch != 0, axis=1)), 'a branch was dropped only in part'
        rate = 0.5 * index / 9
        sigma = np.sqrt(rate * (1 - rate) / 1000)
        assert abs(dropped.mean() - rate) < 5 * sigma, (name, dropped.mean(), rate)
    # The first block sees the same input with or without drop-path: kept branches are rescaled.
    _, undropped = sown(get_model('resnet20'), v, x, train=True)
    first = np.asarray(inter['stage1_block0']['branch'][0])
    kept = np.any(first.reshape(1000, -1) != 0, axis=1)
    np.testing.assert_allclose(first[kept], np.asarray(undropped['stage1_block0']['branch'][0])[kept] / (1 - 0.5 / 9),
                               rtol=1e-5, atol=1e-5)
    _, eval_inter = sown(model, v, x[:8])
    assert np.all(np.asarray(eval_inter['stage3_block2']['branch'][0]) != 0)


@pytest.mark.slow
def test_branch_dropout_is_active_only_in_training():
    x = images((2, 9, 9, 3))
    model = get_model('wrn16_8', dropout_rate=0.3, width_multiplier=1)
    v = init_variables(model, x)
    np.testing.assert_allclose(logits(model, v, x), logits(get_model('wrn16_8', width_multiplier=1), v, x), **TOL)
    train = [model.apply(v, x, train=True, rngs={'dropout': jax.random.key(s)}, mutable=['batch_stats'])[0]
             for s in (0, 0, 1)]
    np.testing.assert_array_equal(train[0], train[1])
    assert not np.allclose(train[0], train[2])


def test_squeeze_excitation_matches_its_definition():
    x = images((2, 5, 5, 32))
    se = SqueezeExcite(hidden=2, dtype=jnp.float32)
    p = se.init(jax.random.key(0), x)['params']
    mean = x.mean(axis=(1, 2), keepdims=True)
    gate = jax.nn.sigmoid(conv_ref(jax.nn.relu(conv_ref(mean, p['reduce']['kernel'], bias=p['reduce']['bias'])),
                                   p['expand']['kernel'], bias=p['expand']['bias']))
    np.testing.assert_allclose(se.apply({'params': p}, x), x * gate, **TOL)
    v = shapes(get_model('resnet50', se_ratio=1 / 16), images((1, 32, 32, 3)))
    assert v['params']['stage4_block0']['se']['reduce']['kernel'].shape == (1, 1, 2048, 128)


def test_group_norm_and_no_norm():
    x = images((1, 8, 8, 3))
    group = shapes(get_model('resnet20', norm='group', norm_groups=8), x)
    assert 'batch_stats' not in group
    assert group['params']['stage1_block0']['norm1']['scale'].shape == (16,)
    bare = shapes(get_model('resnet20', norm='none'), x)
    norm_params = 2 * (16 + 6 * 16 + 6 * 32 + 6 * 64)  # the stem's norm and two per block
    assert param_count(bare['params']) == 269_722 - norm_params
    assert not any('norm' in name for name in flat_names(bare['params']))


def test_grouped_and_wide_convs_have_the_right_kernels():
    p = shapes(get_model('resnext50_32x4d'), images((1, 32, 32, 3)))['params']
    assert p['stage1_block0']['conv2']['kernel'].shape == (3, 3, 4, 128)  # 32 groups of 4 channels
    assert p['stage4_block0']['conv3']['kernel'].shape == (1, 1, 1024, 2048)
    w = shapes(get_model('wrn16_8'), images((1, 8, 8, 3)))['params']
    assert w['stage3_block1']['conv2']['kernel'].shape == (3, 3, 512, 512)


def test_bfloat16_compute_keeps_float32_parameters_and_logits():
    x = images((2, 17, 17, 3))
    model = get_model('resnet20', dtype='bfloat16')
    v = init_variables(model, x)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(v))
    out, inter = sown(model, v, x)
    assert out.dtype == jnp.float32
    assert inter['stage2_block1']['output'][0].dtype == jnp.bfloat16
    reference = logits(get_model('resnet20'), v, x)
    assert np.max(np.abs(out - reference)) < 0.05 * np.max(np.abs(reference))


# --- Intermediates ---------------------------------------------------------------------------

def test_residual_stream_unrolls_to_the_sum_of_branches():
    """h_L = h_0 + sum_l F_l(h_{l-1}) when every shortcut is an identity (pre-activation)."""
    model = get_model('preact_resnet110', stage_sizes=(4,), widths=(16,))
    x = images((2, 9, 9, 3))
    v = init_variables(model, x)
    stream = residual_stream(model, v, x)
    assert len(stream) == 5
    _, inter = sown(model, v, x)
    branches = sum(inter[name]['branch'][0] for name in model.block_names)
    np.testing.assert_allclose(stream[-1], stream[0] + branches, **TOL)
    for h_prev, h, name in zip(stream, stream[1:], model.block_names):
        np.testing.assert_allclose(h, h_prev + inter[name]['branch'][0], **TOL)


def test_intermediates_are_not_stored_unless_asked_for():
    model = get_model('resnet20')
    x = images((1, 8, 8, 3))
    v = model.init(jax.random.key(0), x)
    assert set(v) == {'params', 'batch_stats'}
    assert [h.shape for h in residual_stream(model, v, x)] == [(1, 8, 8, 16)] * 4 + [(1, 4, 4, 32)] * 3 + [(1, 2, 2, 64)] * 3


# --- Rematerialisation -------------------------------------------------------------------------

@pytest.mark.slow
def test_remat_changes_memory_not_the_function_or_its_gradients():
    """remat=True recomputes blocks in the backward pass: same variables, same training-mode
    loss, BatchNorm updates and gradients (drop-path included, so the recomputation must replay
    the same random draws). The memory saving shows on GPU (ResNet-50, batch 256: 4.0 instead
    of 10.0 GiB, `python -m resnet_jax.bench --remat=false,true`); XLA's CPU backend does not
    shrink its buffers for it, so it is not asserted here."""
    x = images((4, 12, 12, 3))
    labels = jnp.arange(4) % 10
    plain, remat = get_model('resnet20', drop_path_rate=0.1), get_model('resnet20', drop_path_rate=0.1, remat=True)
    v = init_variables(plain, x)
    assert jax.tree_util.tree_structure(v) == jax.tree_util.tree_structure(init_variables(remat, x))

    def loss_and_grads(model):
        def loss(params):
            logits, updates = model.apply(dict(v, params=params), x, train=True, mutable=['batch_stats'],
                                          rngs={'dropout': jax.random.key(3)})
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels]), updates
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(v['params'])

    (loss_p, stats_p), grads_p = loss_and_grads(plain)
    (loss_r, stats_r), grads_r = loss_and_grads(remat)
    np.testing.assert_allclose(loss_r, loss_p, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves((grads_r, stats_r)), jax.tree_util.tree_leaves((grads_p, stats_p))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# --- Population members: numeric design values as traced scalars ----------------------------

def with_shared_design(name, **overrides):
    """Preset `name` rebuilt on its shared design, and the member values that make it `name` again."""
    model = get_model(name, **overrides)
    shared, values = split_member(model.design)
    return model.clone(design=shared), {k: jnp.float32(v) for k, v in values.items()}


def test_a_plain_net_is_its_resnet_twin_with_skip_gain_zero_bit_for_bit():
    x = images((2, 9, 9, 3))
    plain, twin = get_model('plain20'), get_model('resnet20')
    shared, member = with_shared_design('plain20')
    assert shared.design == split_member(twin.design)[0]
    assert member['skip_gain'] == 0 and split_member(twin.design)[1]['skip_gain'] == 1
    v = init_variables(plain, x)
    np.testing.assert_array_equal(shared.apply(v, x, member=member), plain.apply(v, x))
    np.testing.assert_array_equal(shared.apply(v, x, member={'skip_gain': jnp.float32(1)}), twin.apply(v, x))
    train = {'train': True, 'mutable': ['batch_stats'], 'rngs': {'dropout': jax.random.key(1)}}
    # Dropout at traced rate 0 (the member's dropout_rate and drop_path_rate) keeps everything.
    for got, want in zip(jax.tree_util.tree_leaves(shared.apply(v, x, member=member, **train)),
                         jax.tree_util.tree_leaves(plain.apply(v, x, **train))):
        np.testing.assert_array_equal(got, want)
    # One traced network serves both members of a population.
    both = jax.jit(jax.vmap(lambda gain: shared.apply(v, x, member={'skip_gain': gain})))(jnp.array([1.0, 0.0]))
    np.testing.assert_allclose(both, np.stack([twin.apply(v, x), plain.apply(v, x)]), **TOL)


def test_member_scales_equal_the_static_design_and_none_changes_nothing():
    x = images((2, 9, 9, 3))
    static = get_model('resnet20', skip='scale', skip_scale=0.5, branch_scale=2.0)
    shared, member = with_shared_design('resnet20', skip='scale', skip_scale=0.5, branch_scale=2.0)
    assert member == {'skip_scale': 0.5, 'branch_scale': 2.0, 'dropout_rate': 0.0, 'drop_path_rate': 0.0}
    v = init_variables(static, x)
    scales = {k: member[k] for k in ('skip_scale', 'branch_scale')}
    np.testing.assert_array_equal(shared.apply(v, x, member=scales), static.apply(v, x))
    np.testing.assert_array_equal(static.apply(v, x, member=None), static.apply(v, x))
    assert (str(jax.make_jaxpr(lambda v: static.apply(v, x, member=None))(v))
            == str(jax.make_jaxpr(lambda v: static.apply(v, x))(v)))
    with pytest.raises(ValueError, match="'skip_gain' does not apply to skip='scale'"):
        static.apply(v, x, member={'skip_gain': 1.0})


def test_member_dropout_rates_draw_the_stream_of_the_static_design():
    x = images((8, 9, 9, 3))
    rngs = {'dropout': jax.random.key(5)}
    for field in ('drop_path_rate', 'dropout_rate'):
        static = get_model('resnet20', **{field: 0.3})
        shared, member = with_shared_design('resnet20', **{field: 0.3})
        v = init_variables(static, x)
        got = shared.apply(v, x, train=True, mutable=['batch_stats'], rngs=rngs, member={field: member[field]})
        want = static.apply(v, x, train=True, mutable=['batch_stats'], rngs=rngs)
        assert not np.allclose(want[0], get_model('resnet20').apply(v, x, train=True, mutable=['batch_stats'])[0])
        np.testing.assert_allclose(got[0], want[0], **TOL)


def test_only_parameter_free_shortcuts_let_a_plain_net_share_its_twins_population():
    shared = {name: split_member(get_model(name).design)[0] for name in ('plain18', 'resnet18', 'resnet20')}
    assert shared['plain18'] != shared['resnet18']  # projection shortcuts: the twin has parameters
    assert shared['plain18'].skip == 'none' and 'skip_gain' not in shared['plain18'].member_keys()
    assert set(MEMBER_FIELDS) >= {'skip', 'skip_scale', 'branch_scale', 'drop_path_rate', 'dropout_rate'}
