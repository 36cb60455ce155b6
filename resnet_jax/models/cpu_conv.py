"""The convolution the models run on CPU: oneDNN's where it is in use (models/onednn.py; a
differentiated conv, one device per process), otherwise XLA's own conv with its slow cases routed
elsewhere; and the stems' max pool on CPU (`max_pool_3x3_2d`).

Three things make XLA's CPU backend slow at a ResNet's training step (measured in
experiments/perf/CPU_NOTES.md):

1. Recomputed activations. XLA:CPU duplicates cheap elementwise producers into every
   fusible consumer. A block's output relu(bn(conv) + shortcut) is such a producer, and so
   is the previous block's output inside it, so the transposed copy of a conv input that the
   weight gradient needs recomputes the residual stream back to the last non-fusible op,
   block after block. (`lax.optimization_barrier` does not stop this: XLA:CPU removes it
   before fusion.) Here the conv input is passed through a gather of all its rows, exactly
   the identity, which XLA neither simplifies nor duplicates into its consumers, so the input
   is computed once and every gradient reads that copy.
2. Lhs-dilated convolutions. The input gradient of a strided conv is a conv of the gradient
   dilated by the stride, which XLA runs on a generic slow loop. Here it is a matrix product
   of the gradient with the kernel followed by the transpose of the patch extraction (pads
   and adds).
3. Kernels larger than the image (a 3x3 conv on a 2x2 map, e.g. ResNet-50's last stage at
   64x64 input). XLA swaps the operands into layouts its fast conv does not take. Here the
   forward conv and the weight gradient are matrix products over image patches (im2col).

The function computed is exactly `jax.lax.conv_general_dilated`'s (the same sums, in another
order, so results agree to float32 rounding). Where it applies: the CPU backend (decided when
the step is traced, from `jax.default_backend()`, the platform of `jax.devices()` and so of the
training mesh), float32 NHWC input with HWIO kernels, no input dilation, one feature group and
one batch group (`precision` is moot for float32 on CPU). Everything else -- GPU and TPU, grouped and depthwise convs, video convs -- calls
`jax.lax.conv_general_dilated` unchanged, so what those backends compile does not change.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
from jax import lax

from resnet_jax.models import onednn

NHWC = ('NHWC', 'HWIO', 'NHWC')


def strided_views(padded, kernel_size, strides, dilation):
    """(views, (Ho, Wo)): the kh*kw strided views of padded NHWC input that a window reads, in the
    window's row-major order, each (N, Ho, Wo, C)."""
    (kh, kw), (sh, sw), (dh, dw) = kernel_size, strides, dilation
    ho = (padded.shape[1] - dh * (kh - 1) - 1) // sh + 1
    wo = (padded.shape[2] - dw * (kw - 1) - 1) // sw + 1
    views = [padded[:, i * dh:i * dh + (ho - 1) * sh + 1:sh, j * dw:j * dw + (wo - 1) * sw + 1:sw, :]
             for i in range(kh) for j in range(kw)]
    return views, (ho, wo)


def patches(x, kernel_size, strides, padding, dilation):
    """im2col: (N, Ho, Wo, kh*kw*C) with the last axis ordered (kh, kw, C) like an HWIO kernel.

    Built from strided slices of the padded input, which XLA fuses into one copy (its own
    conv_general_dilated_patches is a conv with an identity kernel, far slower on CPU)."""
    cols, _ = strided_views(jnp.pad(x, ((0, 0), *padding, (0, 0))), kernel_size, strides, dilation)
    return jnp.concatenate(cols, axis=-1) if len(cols) > 1 else cols[0]


def _lax_conv(x, kernel, strides, padding, dilation):
    return lax.conv_general_dilated(x, kernel, strides, padding, rhs_dilation=dilation, dimension_numbers=NHWC)


def _patch_conv(x, kernel, strides, padding, dilation):
    """The forward conv as patches(x) @ kernel."""
    p = patches(x, kernel.shape[:2], strides, padding, dilation)
    return lax.dot_general(p, kernel.reshape(-1, kernel.shape[-1]), (((3,), (0,)), ((), ())))


def weight_grad(x, g, kernel_size, strides, padding, dilation=(1, 1)):
    """d(loss)/d(kernel) as one matrix product: patches(x)^T @ g, in HWIO."""
    p = patches(x, kernel_size, strides, padding, dilation)
    dk = lax.dot_general(p.reshape(-1, p.shape[-1]), g.reshape(-1, g.shape[-1]), (((0,), (0,)), ((), ())))
    return dk.reshape(*kernel_size, x.shape[-1], g.shape[-1])


def input_grad(x_shape, kernel, g, strides, padding, dilation=(1, 1)):
    """d(loss)/d(x): g @ kernel^T gives each patch's gradient; the transpose of the patch
    extraction (pads and adds, fused by XLA) sums them back onto the input."""
    kh, kw, c, o = kernel.shape
    dp = lax.dot_general(g, kernel.reshape(kh * kw * c, o), (((3,), (1,)), ((), ())))
    extract = functools.partial(patches, kernel_size=(kh, kw), strides=strides, padding=padding,
                                dilation=dilation)
    return jax.linear_transpose(extract, jax.ShapeDtypeStruct(x_shape, g.dtype))(dp)[0]


def materialize(x):
    """x itself, computed once: the rows of x gathered at indices 0..n-1. XLA:CPU fuses x's
    producers into the gather, so the one fusion that computes x also writes it, and it does not
    duplicate a gather into consumers or simplify it away (see point 1 of the module docstring).
    Exact for every float32 value, subnormals included: a gather only moves data."""
    n = x.shape[0]
    return jnp.take(x.reshape(n, -1), jnp.arange(n), axis=0, mode='clip').reshape(x.shape)


def _plan(x_shape, kernel_shape, strides, padding, dilation):
    """(forward, input gradient, weight gradient): 'lax' for XLA's conv or 'patches' for a
    matrix product, by the rules of the module docstring."""
    eff = [d * (k - 1) + 1 for k, d in zip(kernel_shape[:2], dilation)]
    small = any(e > n for e, n in zip(eff, x_shape[1:3]))
    fwd = dw = 'patches' if small else 'lax'
    dx = 'patches' if small or max(strides) > 1 else 'lax'
    return fwd, dx, dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, kernel, strides, padding, dilation):
    fwd = _plan(x.shape, kernel.shape, strides, padding, dilation)[0]
    return (_patch_conv if fwd == 'patches' else _lax_conv)(x, kernel, strides, padding, dilation)


def _conv_fwd(x, kernel, strides, padding, dilation):
    x = materialize(x)
    return _conv(x, kernel, strides, padding, dilation), (x, kernel)


def _conv_bwd(strides, padding, dilation, residuals, g):
    x, kernel = residuals
    _, dx_impl, dw_impl = _plan(x.shape, kernel.shape, strides, padding, dilation)
    if dx_impl == 'patches':
        dx = input_grad(x.shape, kernel, g, strides, padding, dilation)
    else:
        dx = jax.vjp(lambda x: _lax_conv(x, kernel, strides, padding, dilation), x)[1](g)[0]
    if dw_impl == 'patches':
        dk = weight_grad(x, g, kernel.shape[:2], strides, padding, dilation)
    else:
        dk = jax.vjp(lambda k: _lax_conv(x, k, strides, padding, dilation), kernel)[1](g)[0]
    return dx, dk


_conv.defvjp(_conv_fwd, _conv_bwd)


# oneDNN's conv, where it is in use (models/onednn.py), for what is differentiated: the forward conv
# F(x, k), its input gradient D(g, k) and its weight gradient W(x, g) are bilinear and each other's
# transposes, so each one's vjp is made of the other two and the path can be differentiated to any
# order. A conv that is not differentiated stays XLA's, outside `onednn_forward`: oneDNN's float32 sums
# over long windows (3x3x256 and wider) round 1.5-2.5x more, which SE nets with random statistics
# amplify past the 1e-5 that the export tests hold (experiments/perf/CPU_NOTES.md, entries 21, 25).
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _dnnl_conv(x, kernel, strides, padding, dilation):
    return _conv(x, kernel, strides, padding, dilation)


_ONEDNN_FORWARD = contextvars.ContextVar('onednn_forward', default=False)


@contextlib.contextmanager
def onednn_forward():
    """Within it, while a function is traced, convs that are not differentiated run oneDNN's forward
    kernel too, where oneDNN is in use: the evaluation step's choice (train.step.eval_step), 1.8x
    faster than XLA's conv on a ResNet-20, rounding like PyTorch's (the same library)."""
    token = _ONEDNN_FORWARD.set(True)
    try:
        yield
    finally:
        _ONEDNN_FORWARD.reset(token)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _dnnl_forward(x, kernel, strides, padding, dilation):
    """oneDNN's forward conv: what `_dnnl_conv` computes where it is differentiated."""
    return onednn.conv(x, kernel, strides, padding, dilation)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4, 5))
def _dnnl_input_grad(x_shape, g, kernel, strides, padding, dilation):
    return onednn.input_grad(x_shape, kernel, g, strides, padding, dilation)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _dnnl_weight_grad(x, g, kernel_shape, strides, padding, dilation):
    return onednn.weight_grad(x, kernel_shape, g, strides, padding, dilation)


def _dnnl_conv_bwd(strides, padding, dilation, residuals, g):
    x, kernel = residuals
    return (_dnnl_input_grad(x.shape, g, kernel, strides, padding, dilation),
            _dnnl_weight_grad(x, g, kernel.shape, strides, padding, dilation))


def _dnnl_input_grad_bwd(x_shape, strides, padding, dilation, residuals, c):
    g, kernel = residuals
    return (_dnnl_forward(c, kernel, strides, padding, dilation),
            _dnnl_weight_grad(c, g, kernel.shape, strides, padding, dilation))


def _dnnl_weight_grad_bwd(kernel_shape, strides, padding, dilation, residuals, c):
    x, g = residuals
    return (_dnnl_input_grad(x.shape, g, c, strides, padding, dilation),
            _dnnl_forward(x, c, strides, padding, dilation))


_dnnl_conv.defvjp(lambda x, k, *conf: (_dnnl_forward(x, k, *conf), (x, k)), _dnnl_conv_bwd)
_dnnl_forward.defvjp(lambda x, k, *conf: (_dnnl_forward(x, k, *conf), (x, k)), _dnnl_conv_bwd)
_dnnl_input_grad.defvjp(lambda shape, g, k, *conf: (_dnnl_input_grad(shape, g, k, *conf), (g, k)),
                        _dnnl_input_grad_bwd)
_dnnl_weight_grad.defvjp(lambda x, g, shape, *conf: (_dnnl_weight_grad(x, g, shape, *conf), (x, g)),
                         _dnnl_weight_grad_bwd)


def looped(fn, size: int, in_axes=0):
    """What `jax.vmap(fn, in_axes)` computes, as a Python loop over the `size` entries of the leading
    axis traced into one program (an argument whose in_axes entry is None is passed whole), its results
    stacked. For networks vmapped over their weights on one CPU device: each conv would become a
    batched (grouped) conv, which XLA:CPU runs 5-8x slower than the separate convs (docs/populations.md)."""
    def run(*args):
        axes = tuple(in_axes) if isinstance(in_axes, (tuple, list)) else (in_axes,) * len(args)
        take = lambda a, axis, i: a if axis is None else jax.tree_util.tree_map(lambda v: v[i], a)  # noqa: E731
        outs = [fn(*(take(a, axis, i) for a, axis in zip(args, axes))) for i in range(size)]
        return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *outs)
    return run


def _is_nhwc(lhs, rhs, dimension_numbers) -> bool:
    """Whether the conv reads NHWC input and an HWIO kernel and writes NHWC, in whatever form the
    dimension numbers are given (Flax passes a ConvDimensionNumbers)."""
    if dimension_numbers is None or lhs.ndim != 4:
        return False
    given = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    return given == lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC)


def applies(lhs, rhs, padding, lhs_dilation, dimension_numbers, feature_group_count, batch_group_count,
            preferred_element_type) -> bool:
    """Whether a conv takes the CPU path (see the module docstring for the cases)."""
    return (jax.default_backend() == 'cpu' and _is_nhwc(lhs, rhs, dimension_numbers)
            and feature_group_count == 1 and batch_group_count == 1
            and all(d == 1 for d in (lhs_dilation or (1, 1)))
            and not isinstance(padding, str)
            and preferred_element_type is None and lhs.dtype == rhs.dtype == jnp.float32)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
    """`jax.lax.conv_general_dilated`, with the CPU path where it applies (same signature)."""
    if not applies(lhs, rhs, padding, lhs_dilation, dimension_numbers, feature_group_count,
                   batch_group_count, preferred_element_type):
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, batch_group_count,
                                        precision, preferred_element_type)
    conf = tuple(window_strides), tuple(tuple(p) for p in padding), tuple(rhs_dilation or (1, 1))
    if not uses_onednn(conf[1]):
        return _conv(lhs, rhs, *conf)
    return (_dnnl_forward if _ONEDNN_FORWARD.get() else _dnnl_conv)(lhs, rhs, *conf)


def uses_onednn(padding) -> bool:
    """Whether a CPU-path conv calls oneDNN: where the models use it (onednn.applies), and no padding
    is negative."""
    return all(p >= 0 for pair in padding for p in pair) and onednn.applies()


def _pool_views(x):
    """The 9 strided views of -inf-padded NHWC x that a 3x3/2 window with padding 1 reads, and the
    output's spatial size."""
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    return strided_views(padded, (3, 3), (2, 2), (1, 1))


@jax.custom_vjp
def max_pool_3x3_2d(x):
    """`nn.max_pool` 3x3/2 with padding 1 on CPU, as elementwise maxima of strided views; its gradient
    goes, like XLA's select-and-scatter, to the first maximum of each window in row-major order.
    XLA:CPU expands that select-and-scatter into a reduce-window over four index arrays and a
    scatter: 10% of a ResNet-50 step at 64x64 (experiments/perf/CPU_NOTES.md, entry 22)."""
    views, _ = _pool_views(x)
    return functools.reduce(jnp.maximum, views)


def _max_pool_fwd(x):
    y = max_pool_3x3_2d(x)
    return y, (x, y)


def _max_pool_bwd(residuals, g):
    x, y = residuals
    views, (h, w) = _pool_views(x)
    taken = jnp.zeros(y.shape, bool)
    dx = jnp.zeros((x.shape[0], x.shape[1] + 2, x.shape[2] + 2, x.shape[3]), g.dtype)
    for k, view in enumerate(views):
        first = (view == y) & ~taken
        taken = taken | first
        i, j = divmod(k, 3)
        # back onto the padded grid: view (a, b) is padded (i + 2a, j + 2b)
        spread = ((0, 0, 0), (i, dx.shape[1] - i - 2 * h + 1, 1), (j, dx.shape[2] - j - 2 * w + 1, 1), (0, 0, 0))
        dx = dx + lax.pad(jnp.where(first, g, 0.0), jnp.zeros((), g.dtype), spread)
    return (dx[:, 1:-1, 1:-1],)


max_pool_3x3_2d.defvjp(_max_pool_fwd, _max_pool_bwd)
