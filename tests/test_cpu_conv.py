"""The CPU convolution path computes what jax.lax.conv_general_dilated computes, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import linear
from jax import lax

from resnet_jax.models import cpu_conv
from resnet_jax.models.resnet import ResNet
from tests.helpers import images

# Float32 sums taken in another order: the differences are rounding, far below this.
TOL = dict(rtol=1e-5, atol=1e-5)

# (batch, size, in, kernel, stride, out, dilation): every path of cpu_conv._plan.
CASES = [
    (2, 9, 3, 3, 1, 5, 1),    # XLA's conv for all three
    (2, 10, 4, 3, 2, 6, 1),   # strided 3x3, even size: patch input gradient
    (2, 9, 4, 1, 2, 6, 1),    # strided 1x1 shortcut
    (2, 11, 3, 7, 2, 4, 1),   # ImageNet stem
    (2, 12, 3, 3, 1, 4, 2),   # dilated
    (2, 2, 8, 3, 1, 8, 1),    # kernel larger than the map: patches everywhere
    (2, 1, 8, 3, 1, 8, 1),
    (2, 4, 8, 3, 2, 8, 1),
]


def _conv_pair(x_shape, kernel, stride, dilation):
    pad = [(dilation * (kernel - 1) // 2,) * 2] * 2
    dn = linear._conv_dimension_numbers(x_shape)  # the form Flax passes

    def reference(x, w):
        return lax.conv_general_dilated(x, w, (stride,) * 2, pad, rhs_dilation=(dilation,) * 2, dimension_numbers=dn)

    def ours(x, w):
        return cpu_conv.conv_general_dilated(x, w, (stride,) * 2, pad, rhs_dilation=(dilation,) * 2,
                                             dimension_numbers=dn)
    return reference, ours


@pytest.mark.parametrize('kernels', ['xla', 'onednn'])
@pytest.mark.parametrize('n,size,cin,kernel,stride,cout,dilation', CASES)
def test_forward_and_gradients_match_lax(n, size, cin, kernel, stride, cout, dilation, kernels, monkeypatch):
    """Both CPU paths: XLA's convs with the rules of cpu_conv._plan, and oneDNN's (models/onednn.py)."""
    monkeypatch.setenv('RESNET_JAX_CPU_CONV', kernels)
    x = images((n, size, size, cin))
    w = images((kernel, kernel, cin, cout), seed=1)
    reference, ours = _conv_pair(x.shape, kernel, stride, dilation)
    assert cpu_conv.applies(x, w, [(0, 0)] * 2, None, linear._conv_dimension_numbers(x.shape), 1, 1, None)
    y, vjp = jax.vjp(reference, x, w)
    y_ours, (dx, dw) = jax.jit(lambda x, w, g: (ours(x, w), jax.vjp(ours, x, w)[1](g)))(x, w, images(y.shape, 2))
    dx_ref, dw_ref = vjp(images(y.shape, 2))
    np.testing.assert_allclose(y_ours, y, **TOL)
    np.testing.assert_allclose(dx, dx_ref, **TOL)
    np.testing.assert_allclose(dw, dw_ref, **TOL)


def test_materialize_is_exactly_the_identity():
    # -0.0, infinities, NaN and subnormals come back bit for bit.
    x = jnp.array([1.5, -0.0, 0.0, jnp.inf, -jnp.inf, jnp.nan, -3.0, 3e38, 1e-45, -1e-40, 7.0, 0.25],
                  jnp.float32).reshape(3, 2, 1, 2)
    y = jax.jit(cpu_conv.materialize)(x)
    np.testing.assert_array_equal(np.asarray(y).view(np.uint32), np.asarray(x).view(np.uint32))


def test_materialize_survives_xla_cpu():
    """The reason it exists: XLA keeps the gather, computing its producers once inside it, and does not
    duplicate it into its consumers (an optimization_barrier would be removed before fusion)."""
    def f(x):
        y = cpu_conv.materialize(jnp.maximum(x * 3.0, 0.0))
        return y * 2, y.T
    hlo = jax.jit(f).lower(jnp.ones((2, 4))).compile().as_text()
    assert 'gather(' in hlo
    assert hlo.count(' maximum(') == 1, hlo


@pytest.mark.parametrize('case', ['grouped', 'video', 'input_dilation', 'bfloat16', 'other_backend'])
def test_other_convs_go_to_lax_unchanged(case, monkeypatch):
    x, w, groups, lhs_dilation = images((1, 6, 6, 4)), images((3, 3, 2, 4), 1), 2, None
    dn = linear._conv_dimension_numbers(x.shape)
    if case == 'video':
        x, w, groups = images((1, 3, 6, 6, 4)), images((3, 3, 3, 4, 4), 1), 1
        dn = linear._conv_dimension_numbers(x.shape)
    elif case == 'input_dilation':
        w, groups, lhs_dilation = images((3, 3, 4, 4), 1), 1, (2, 2)
    elif case == 'bfloat16':
        x, w, groups = x.astype(jnp.bfloat16), images((3, 3, 4, 4), 1).astype(jnp.bfloat16), 1
    elif case == 'other_backend':
        w, groups = images((3, 3, 4, 4), 1), 1
        monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
    assert not cpu_conv.applies(x, w, [(1, 1)] * (x.ndim - 2), lhs_dilation, dn, groups, 1, None)
    # Whatever the case, the lax call it falls back to gives lax's answer.
    pad = [(1, 1)] * (x.ndim - 2)
    args = (x, w, (1,) * (x.ndim - 2), pad, lhs_dilation, None, dn, groups)
    np.testing.assert_array_equal(cpu_conv.conv_general_dilated(*args), lax.conv_general_dilated(*args))


@pytest.mark.slow
def test_model_gradients_match_the_lax_model(monkeypatch):
    """A small ResNet with strided blocks and a 1x1 final map: same loss and gradients as with lax convs."""
    model = ResNet(num_classes=5, stage_sizes=(1, 1, 1), widths=(8, 16, 16), stem='cifar', stem_width=8)
    x = images((4, 4, 4, 3))
    variables = model.init(jax.random.key(0), x)

    def loss(params):
        out, _ = model.apply(dict(variables, params=params), x, train=True, mutable=['batch_stats'])
        return (out ** 2).mean()

    monkeypatch.setenv('RESNET_JAX_CPU_CONV', 'xla')
    ours = jax.jit(jax.value_and_grad(loss))(variables['params'])
    monkeypatch.setattr(cpu_conv, 'applies', lambda *a: False)
    reference = jax.jit(jax.value_and_grad(loss))(variables['params'])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), ours, reference)


def test_looped_computes_what_vmap_computes():
    """A small conv net over a stack of 3 weight sets, with an argument passed whole (in_axes None):
    the loop gives vmap's values and stacked tree."""
    rng = np.random.default_rng(0)
    kernels = jnp.asarray(rng.normal(size=(3, 3, 3, 4, 5)), jnp.float32)
    scales = {'a': jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)}
    x = images((2, 6, 6, 4))

    def net(kernel, scale, x):
        y = lax.conv_general_dilated(x, kernel, (1, 1), 'SAME', dimension_numbers=cpu_conv.NHWC)
        return {'out': jnp.tanh(y * scale['a']), 'sum': y.sum()}

    want = jax.jit(jax.vmap(net, in_axes=(0, 0, None)))(kernels, scales, x)
    got = jax.jit(cpu_conv.looped(net, 3, in_axes=(0, 0, None)))(kernels, scales, x)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, **TOL)


@pytest.mark.parametrize('shape,ties', [((2, 9, 9, 3), False), ((2, 8, 8, 3), False), ((2, 7, 6, 4), True),
                                        ((1, 1, 1, 2), False)])
def test_cpu_max_pool_matches_flax(shape, ties):
    """The stems' max pool on CPU (cpu_conv.max_pool_3x3_2d): nn.max_pool's values exactly, and its
    gradient, which goes to the first maximum of each window in row-major order: exactly so where
    inputs tie (small integers), to rounding where overlapping windows' gradients add up in another order."""
    from flax import linen as nn

    from resnet_jax.models import resnet
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, 3, shape) if ties else rng.normal(size=shape), jnp.float32)
    y, vjp = jax.vjp(resnet.max_pool_3x3, x)
    y_ref, vjp_ref = jax.vjp(lambda x: nn.max_pool(x, (3, 3), (2, 2), padding=[(1, 1)] * 2), x)
    np.testing.assert_array_equal(y, y_ref)
    g = images(y.shape, 1)
    if ties:
        g = jnp.round(g * 4)  # small integers: every sum exact, so any misrouted gradient shows
        np.testing.assert_array_equal(jax.jit(vjp)(g)[0], vjp_ref(g)[0])
    else:
        np.testing.assert_allclose(jax.jit(vjp)(g)[0], vjp_ref(g)[0], rtol=0, atol=1e-6)
