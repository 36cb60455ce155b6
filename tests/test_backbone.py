"""Backbone outputs: stage features, output stride by dilation, and the 3D (video) ResNets.

Dilation is checked three ways: a dilated conv against a dense conv with the zero-inserted
kernel (its definition); whole dilated networks against the property that defines the
algorithme a trous (the dilated net's features, subsampled, are exactly the strided net's, with
the same weights); and a dilated ResNet-50 against the torch.nn twin built with torchvision's
replace_stride_with_dilation rules. The video nets are checked against torchvision's parameter
count, their own stem definition and a torch.nn R3D twin with torchvision's key layout. Shapes
of big models come from jax.eval_shape; variables are drawn with numpy to keep compiles few.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import images, sown, tiny_config

from resnet_jax.errors import ConfigError
from resnet_jax.models import BlockDesign, ResidualBlock, get_model
from resnet_jax.models.resnet import conv
from resnet_jax.models.torchvision_import import from_torchvision
from resnet_jax.pytorch.reference import (
    Bottleneck,
    ReferenceR3D,
    ReferenceResNet,
    randomize_,
)
from resnet_jax.train.config import validate


def numpy_variables(model, x, seed=0):
    """Random variables for `model` drawn with numpy (no initialiser to compile): He-scaled kernels,
    BatchNorm scales near 1 and random statistics, so eval-mode BN is not the identity."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == 'kernel':
            return jnp.asarray(rng.normal(0, (2 / math.prod(shape[:-1])) ** 0.5, shape), jnp.float32)
        low, high = {'scale': (0.5, 1.5), 'var': (0.5, 2.0)}.get(name, (-0.2, 0.2))
        return jnp.asarray(rng.uniform(low, high, shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, jax.eval_shape(model.init, jax.random.key(0), x))


def _assert_close(ours, ref, rtol=1e-5):
    """|ours - ref| <= rtol * (|ref| + max|ref|): relative to the scale of the whole map."""
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape
    assert np.abs(ref).max() > 1e-2, 'degenerate reference makes the comparison vacuous'
    np.testing.assert_allclose(ours, ref, rtol=rtol, atol=rtol * np.abs(ref).max())


# --- a dilated conv is its definition -----------------------------------------------------------

@pytest.mark.parametrize('dims, dilation, groups', [(2, 3, 2), (3, 2, 1)])
def test_dilated_conv_is_a_dense_conv_with_a_zero_inserted_kernel(dims, dilation, groups):
    x = images((2,) + (9, 8, 7)[:dims] + (4,))
    layer = conv(6, 3, 1, groups, name='c', dtype=jnp.float32, dims=dims, dilation=dilation)
    variables = numpy_variables(layer, x)
    kernel = np.asarray(variables['params']['kernel'])
    # The definition: taps d apart = a (2d+1)-wide kernel that is zero between the taps.
    dense = np.zeros((2 * dilation + 1,) * dims + kernel.shape[-2:], np.float32)
    dense[(slice(None, None, dilation),) * dims] = kernel
    spatial = 'DHW'[-dims:]
    expected = jax.lax.conv_general_dilated(
        x, dense, (1,) * dims, [(dilation, dilation)] * dims, feature_group_count=groups,
        dimension_numbers=(f'N{spatial}C', f'{spatial}IO', f'N{spatial}C'))
    out = layer.apply(variables, x)
    assert out.shape == x.shape[:-1] + (6,)  # padding d * (k - 1) / 2 keeps the size
    _assert_close(out, expected)


# --- whole networks: the a trous property and torchvision's semantics ----------------------------

SMALL = dict(stage_sizes=(1, 1, 2, 2), widths=(8, 16, 32, 64), stem_width=16)


def test_a_dilated_block_with_an_average_pool_shortcut_trains():
    """Gradients reach every parameter through dilated convs and the stride-1 average-pool (D)
    shortcut of a block whose stride became dilation."""
    block = ResidualBlock(8, 1, BlockDesign(shortcut='D'), dilation=4, first_dilation=2)
    x = images((2, 9, 9, 4))
    variables = numpy_variables(block, x)

    def loss(params, x):  # a block inside a network: its input depends on earlier parameters
        out, _ = block.apply(dict(variables, params=params), x, train=True, mutable=['batch_stats'])
        return (out ** 2).sum()

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables['params'], x)
    assert set(grads[0]) == {'conv1', 'norm1', 'conv2', 'norm2', 'shortcut_conv', 'shortcut_norm'}
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        assert np.isfinite(g).all() and np.abs(g).max() > 0, jax.tree_util.keystr(path)


@pytest.mark.parametrize('name, overrides, size', [
    ('resnet50', SMALL, 35),                           # bottleneck, B shortcuts
    # basic blocks, deep stem, avg-pool (D) shortcuts; timm's dilated pool (the default) breaks the property
    ('resnet18_d', dict(SMALL, dilated_pool='a_trous'), 35),
    ('resnet20', dict(stage_sizes=(1, 2, 2)), 15),     # CIFAR: option A shortcuts
])
def test_dilated_features_subsampled_equal_the_strided_features(name, overrides, size):
    """With the same weights, output stride s/r computes the stride-s network on an r-times finer
    grid: every feature map, subsampled by its stride ratio, equals the undilated one. This holds
    only if the first block of each dilated stage keeps the previous dilation and every shortcut
    (projection, zero-pad, average pool) follows the stride it replaces. The smallest output stride
    dilates every stage but the first, so each stage has a first block after a dilated one."""
    base = get_model(name, output='features', **overrides)
    x = images((2, size, size, 3), seed=3)
    variables = numpy_variables(base, x)
    model = base.clone(output_stride=base.output_strides[-1])
    assert jax.tree_util.tree_map(jnp.shape, jax.eval_shape(model.init, jax.random.key(0), x)) == \
        jax.tree_util.tree_map(jnp.shape, variables), 'dilation must not change the variables'
    expected, features = jax.jit(lambda v, x: (base.apply(v, x), model.apply(v, x)))(variables, x)
    assert [s for s, _, _ in model.stage_layout] == [1] * len(base.stage_sizes)
    for level, reference in expected.items():
        r = base.feature_strides[level][0] // model.feature_strides[level][0]
        assert features[level].shape[1] == math.ceil(size / model.feature_strides[level][0])
        _assert_close(features[level][:, ::r, ::r], reference)
    assert r == base.output_strides[0] // base.output_strides[-1]


@pytest.mark.slow
def test_dilated_resnet50_equals_torchvisions_replace_stride_with_dilation():
    """DeepLab's output stride 8: layers 3 and 4 dilated by 2 and 4, their first blocks at 1 and 2."""
    output_stride = 8
    ref = randomize_(ReferenceResNet(Bottleneck, (1, 1, 2, 2), num_classes=10,
                                     replace_stride_with_dilation=(False, True, True)), seed=8).eval()
    model = get_model('resnet50', stage_sizes=(1, 1, 2, 2), num_classes=10, output_stride=output_stride)
    variables = from_torchvision(ref.state_dict(), model)
    x = np.random.default_rng(0).standard_normal((2, 3, 33, 33), dtype=np.float32)
    with torch.no_grad():
        stages, logits = ref.stages(torch.from_numpy(x)), ref(torch.from_numpy(x)).numpy()
    # The head-less features model takes the logits model's variables as they are.
    features = jax.jit(model.clone(output='features').apply)(variables, x.transpose(0, 2, 3, 1))
    assert list(features) == ['C2', 'C3', 'C4', 'C5']
    for (level, ours), theirs in zip(features.items(), stages):
        _assert_close(ours, theirs.numpy().transpose(0, 2, 3, 1))
    assert features['C5'].shape[1:3] == (math.ceil(33 / output_stride),) * 2
    head = variables['params']['head']
    _assert_close(features['C5'].mean(axis=(1, 2)) @ head['kernel'] + head['bias'], logits)


# --- shapes and strides for every output stride ---------------------------------------------------

def _feature_shapes(model, shape):
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    out, _ = jax.eval_shape(model.init_with_output, jax.random.key(0), x)
    return {level: a.shape for level, a in out.items()}


@pytest.mark.parametrize('name, size, sizes', [
    # feature map side per output stride, for C2..C5 (ImageNet) or C0..C2 (CIFAR)
    ('resnet50', 224, {32: (56, 28, 14, 7), 16: (56, 28, 14, 14), 8: (56, 28, 28, 28), 4: (56, 56, 56, 56)}),
    ('resnet18', 65, {32: (17, 9, 5, 3), 16: (17, 9, 5, 5), 8: (17, 9, 9, 9), 4: (17, 17, 17, 17)}),
    ('resnet20', 32, {4: (32, 16, 8), 2: (32, 16, 16), 1: (32, 32, 32)}),
])
def test_feature_shapes_and_strides_for_every_output_stride(name, size, sizes):
    model = get_model(name, output='features')
    assert model.output_strides == tuple(sizes)
    levels = ('C2', 'C3', 'C4', 'C5') if model.stem == 'imagenet' else ('C0', 'C1', 'C2')
    channels = [model.design.out_channels(p) for p in model.stage_planes]
    for output_stride, sides in sizes.items():
        m = model.clone(output_stride=output_stride)
        assert _feature_shapes(m, (2, size, size, 3)) == {
            level: (2, side, side, c) for level, side, c in zip(levels, sides, channels)}
        assert m.feature_strides == {level: (min(2 ** int(level[1:]), output_stride),) * 2
                                     for level in levels}


def test_outputs_features_and_pooled_are_what_the_head_reads():
    """'features' are the stage outputs (the last one after the final norm in pre-activation nets),
    'pooled' is their spatial mean, and the head applied to it gives the logits."""
    for overrides in (dict(), dict(placement='preact', shortcut='B')):
        model = get_model('resnet20', stage_sizes=(1, 1, 1), **overrides)
        x = images((2, 8, 8, 3), seed=1)
        variables = numpy_variables(model, x)
        (logits, inter), features, pooled = jax.jit(lambda v, x: (
            sown(model, v, x), model.clone(output='features').apply(v, x),
            model.clone(output='pooled').apply(v, x)))(variables, x)
        head_less = jax.eval_shape(model.clone(output='features').init, jax.random.key(0), x)
        assert 'head' not in head_less['params']
        for level, block in zip(('C0', 'C1'), ('stage1_block0', 'stage2_block0')):
            np.testing.assert_array_equal(features[level], inter[block]['output'][0])
        last = inter['stage3_block0']['output'][0]
        if model.design.preact:
            p, s = variables['params']['final_norm'], variables['batch_stats']['final_norm']
            last = jax.nn.relu((last - s['mean']) / jnp.sqrt(s['var'] + 1e-5) * p['scale'] + p['bias'])
        _assert_close(features['C2'], last)
        _assert_close(pooled, last.mean(axis=(1, 2)))
        head = variables['params']['head']
        _assert_close(pooled @ head['kernel'] + head['bias'], logits)


# --- 3D ResNets ------------------------------------------------------------------------------------

def test_r3d_18_shapes_strides_and_stem():
    model = get_model('r3d_18')
    clip = jax.ShapeDtypeStruct((2, 16, 112, 112, 3), jnp.float32)
    logits, _ = jax.eval_shape(model.init_with_output, jax.random.key(0), clip)
    assert logits.shape == (2, 400)
    assert _feature_shapes(model.clone(output='features'), clip.shape) == {
        'C1': (2, 16, 56, 56, 64), 'C2': (2, 8, 28, 28, 128), 'C3': (2, 4, 14, 14, 256),
        'C4': (2, 2, 7, 7, 512)}
    assert model.feature_strides == {'C1': (1, 2, 2), 'C2': (2, 4, 4), 'C3': (4, 8, 8), 'C4': (8, 16, 16)}
    assert model.output_strides == (16, 8, 4, 2)

    # The stem is torchvision's BasicStem: a (3,7,7) conv, stride (1,2,2), padding (1,3,3), BN, ReLU;
    # checked numerically on a small network.
    tiny = get_model('r3d_18', stage_sizes=(1, 1, 1, 1), widths=(4, 4, 8, 8), stem_width=4, num_classes=5)
    x = images((1, 5, 12, 12, 3), seed=2)
    variables = numpy_variables(tiny, x)
    logits, inter = jax.jit(lambda v, x: sown(tiny, v, x))(variables, x)
    p, s = variables['params'], variables['batch_stats']
    h = jax.lax.conv_general_dilated(x, p['stem_conv']['kernel'], (1, 2, 2), [(1, 1), (3, 3), (3, 3)],
                                     dimension_numbers=('NDHWC', 'DHWIO', 'NDHWC'))
    h = jax.nn.relu((h - s['stem_norm']['mean']) / jnp.sqrt(s['stem_norm']['var'] + 1e-5)
                    * p['stem_norm']['scale'] + p['stem_norm']['bias'])
    _assert_close(inter['stem'][0], h)
    assert logits.shape == (1, 5) and np.isfinite(logits).all()
    # Later stages stride time too (3x3x3 convs, stride 2 on every axis) and project with 1x1x1 convs.
    assert inter['stage2_block0']['output'][0].shape == (1, 3, 3, 3, 4)
    assert p['stage2_block0']['shortcut_conv']['kernel'].shape == (1, 1, 1, 4, 4)


def test_torchvision_video_weights_give_the_torch_twins_features_and_logits():
    """torchvision's r3d layout (stem.0, layer1.0.conv1.0, ...) converts into r3d_18's variables; the
    torch.nn twin and our network then agree on every stage and the logits, on a clip with odd sizes."""
    ref = randomize_(ReferenceR3D((1, 1, 1, 1), num_classes=7), seed=3).eval()
    model = get_model('r3d_18', stage_sizes=(1, 1, 1, 1), num_classes=7)
    variables = from_torchvision(ref.state_dict(), model)
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 19, 17), dtype=np.float32)  # NCTHW
    with torch.no_grad():
        stages, logits = ref.stages(torch.from_numpy(x)), ref(torch.from_numpy(x)).numpy()
    features = jax.jit(model.clone(output='features').apply)(variables, x.transpose(0, 2, 3, 4, 1))
    for (level, ours), theirs in zip(features.items(), stages):
        _assert_close(ours, theirs.numpy().transpose(0, 2, 3, 4, 1))
    head = variables['params']['head']
    _assert_close(features['C4'].mean(axis=(1, 2, 3)) @ head['kernel'] + head['bias'], logits)
    # The whole r3d_18 layout: from_torchvision refuses a missing, left-over or mis-shaped key.
    full = from_torchvision(ReferenceR3D().state_dict(), get_model('r3d_18'))
    assert full['params']['stem_conv']['kernel'].shape == (3, 7, 7, 3, 64)


# --- bad input ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('name, overrides, message', [
    ('resnet50', dict(output_stride=12), "output_stride=12 is not possible for stem='imagenet' with 4 stages; "
                                         'choose one of: 32, 16, 8, 4'),
    ('resnet20', dict(output_stride=8), 'choose one of: 4, 2, 1'),
    ('r3d_18', dict(output_stride=32), 'choose one of: 16, 8, 4, 2'),
    ('resnet18', dict(output='boxes'),
     "output='boxes' is not allowed; choose one of: 'logits', 'features', 'pooled'"),
    ('resnet18', dict(spatial_dims=3),
     "stem='imagenet' does not exist with spatial_dims=3; choose one of: 'r3d', 'cifar'"),
    ('resnet18', dict(stem='r3d'), "stem='r3d' does not exist with spatial_dims=2; choose one of: 'imagenet'"),
    ('resnet18', dict(spatial_dims=1), 'spatial_dims=1 is not allowed; choose one of: 2, 3'),
])
def test_bad_backbone_fields_are_named_with_the_allowed_values(name, overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        get_model(name, **overrides)


def test_input_of_the_wrong_rank_is_refused_with_the_layout():
    with pytest.raises(ValueError, match=re.escape('takes NTHWC input; got shape (1, 32, 32, 3)')):
        jax.eval_shape(get_model('r3d_18').init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_training_config_takes_output_stride_and_refuses_video_nets():
    validate(tiny_config(**{'model.output_stride': 2}), num_devices=1)
    with pytest.raises(ConfigError, match=re.escape('config.model: output_stride=8 is not possible')):
        validate(tiny_config(**{'model.output_stride': 8}), num_devices=1)
    with pytest.raises(ConfigError, match=r"config\.model\.name: 'r3d_18' is a video network"):
        validate(tiny_config(**{'model.name': 'r3d_18', 'model.stage_sizes': None, 'model.widths': None,
                                'model.stem_width': None}), num_devices=1)
