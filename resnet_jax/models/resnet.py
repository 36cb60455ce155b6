"""The generic ResNet: one Flax module whose fields cover the published variants.

A network is a stem, stages of residual blocks and a linear head. Every block is built from
the same `BlockDesign`, so plain nets, pre-activation nets, gated skips, Fixup and the rest
are field values rather than classes. Layouts follow PyTorch conventions (symmetric padding
of (k - 1) / 2, BatchNorm momentum 0.1 in torch terms, epsilon 1e-5) so torchvision weights
convert exactly; tensors are NHWC, or NTHWC for video nets (`spatial_dims=3`), which reuse the
same blocks with 3x3x3 convs.

Blocks `sow` what they computed into the 'intermediates' collection: 'output' (the residual
stream h_l), 'branch' (what the branch added) and 'shortcut'; the stem sows h_0 as 'stem'.
Nothing is stored unless the caller makes that collection mutable, so analysis needs no
second implementation of the network.

A block reads as three parts: its branch (`ResidualBlock._branch`), the combination of branch and
shortcut (`_combine`, the skip mode's weighting in `_skip`) and the initialisation scheme
(`BranchInit`), which adds its scalars and zeroes to the branch without the branch branching on it.
The optional `member` argument carries one population member's numeric design values as traced
scalars (`design.split_member`), so one vmapped network trains members that differ in them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
from jax.custom_derivatives import SymbolicZero
import jax.numpy as jnp
import numpy as np

from resnet_jax.errors import check_choice
from resnet_jax.models import cpu_conv, onednn
from resnet_jax.models.design import BlockDesign

# Each stem: its conv kernel, the strides of its convs (three convs for 'deep') and whether a 3x3/2
# max pool follows. 'r3d' is torchvision's video BasicStem (Tran et al. 2018), with kernel and stride
# per (time, height, width) axis.
STEM_LAYOUTS = {
    'imagenet': (7, (2,), True),
    'deep': (3, (2, 1, 1), True),
    'cifar': (3, (1,), False),
    'r3d': ((3, 7, 7), ((1, 2, 2),), False),
}
STEMS = tuple(STEM_LAYOUTS)
STEMS_BY_DIMS = {2: ('imagenet', 'deep', 'cifar'), 3: ('r3d', 'cifar')}
# What the network returns: class logits, the dict of stage features, or the pooled vector the head reads.
OUTPUTS = ('logits', 'features', 'pooled')

# He et al. initialisation as torchvision applies it, and torch's default for the classifier.
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
dense_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def _per_dim(value, dims: int) -> tuple[int, ...]:
    """An int or a per-axis tuple as a tuple with one entry per spatial axis."""
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims


def conv(features: int, kernel, stride=1, groups: int = 1, *, name: str, dtype: Any, dims: int = 2,
         dilation: int = 1, kernel_init=conv_init, use_bias: bool = False,
         bias_init=nn.initializers.zeros) -> nn.Conv:
    """A conv over `dims` spatial axes with PyTorch's symmetric padding dilation * (k - 1) / 2, so
    odd and even sizes match torchvision; `kernel` and `stride` are ints or per-axis tuples."""
    kernel = _per_dim(kernel, dims)
    pad = [(dilation * (k - 1) // 2,) * 2 for k in kernel]
    return nn.Conv(features, kernel, _per_dim(stride, dims), padding=pad, kernel_dilation=dilation,
                   feature_group_count=groups, use_bias=use_bias, kernel_init=kernel_init,
                   bias_init=bias_init, dtype=dtype, conv_general_dilated=cpu_conv.conv_general_dilated,
                   name=name)


def batch_norm_train(groups, scale, bias, epsilon):
    """Training-mode BatchNorm of `groups` (groups, n, ..., C), each group by its own statistics, in
    Flax's arithmetic: (y, mean, var), the statistics with shape (groups, 1, ..., 1, C)."""
    axes = tuple(range(1, groups.ndim - 1))
    x32 = groups.astype(jnp.float32)
    mean = x32.mean(axes, keepdims=True)
    var = jnp.maximum(0.0, jnp.square(x32).mean(axes, keepdims=True) - jnp.square(mean))
    return (groups - mean) * (scale * jax.lax.rsqrt(var + epsilon)) + bias, mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_onednn_grad(groups, scale, bias, epsilon):
    """`batch_norm_train` of one group of float32 values, its gradient computed by oneDNN's BatchNorm
    backward (models/onednn.py) from x and the statistics, one fused pass where XLA's autodiff
    keeps x - mean and makes several (experiments/perf/CPU_NOTES.md). XLA's forward pass stays: it
    fuses the normalisation into the ReLU after it. A variance clamped at zero (a constant channel) is
    differentiated as if it were not, a difference within float32 rounding of x - mean."""
    return batch_norm_train(groups, scale, bias, epsilon)


def _batch_norm_fwd(groups, scale, bias, epsilon):
    groups, scale, bias = groups.value, scale.value, bias.value  # symbolic_zeros=True wraps the primals
    if groups.shape[0] != 1:  # the backward computes one set of statistics (norm_by_onednn checks this)
        raise ValueError(f'batch_norm_onednn_grad takes one BatchNorm group, got {groups.shape[0]}')
    y, mean, var = batch_norm_train(groups, scale, bias, epsilon)
    return (y, mean, var), (groups, scale, mean, var)


def _batch_norm_bwd(epsilon, residuals, cotangents):
    x, scale, mean, var = residuals
    g, g_mean, g_var = cotangents
    channels = x.shape[-1]
    dx, dscale, dbias = onednn.batch_norm_grad(x[0], g[0], scale, mean.reshape(channels), var.reshape(channels),
                                               epsilon)
    dx = dx[None]
    if not isinstance(g_mean, SymbolicZero) or not isinstance(g_var, SymbolicZero):
        # the statistics' own gradients, zero in a training step (they only feed the running averages)
        count = x.size // channels
        g_mean = jnp.zeros_like(mean) if isinstance(g_mean, SymbolicZero) else g_mean
        g_var = jnp.zeros_like(var) if isinstance(g_var, SymbolicZero) else g_var
        dx = dx + (g_mean + 2 * g_var * (x - mean)) / count
    return dx, dscale, dbias


batch_norm_onednn_grad.defvjp(_batch_norm_fwd, _batch_norm_bwd, symbolic_zeros=True)


def norm_by_onednn(groups) -> bool:
    """Whether training-mode BatchNorm runs as oneDNN's: one group of float32 values, and oneDNN in use
    on a one-device CPU process (models.onednn.applies). Decided when the step is traced."""
    return groups.shape[0] == 1 and groups.dtype == jnp.float32 and onednn.applies()


class BatchNorm(nn.Module):
    """BatchNorm over the channels (last axis) with PyTorch's momentum 0.1 and epsilon 1e-5, Flax's
    arithmetic (statistics in float32, var = E[x^2] - E[x]^2) and Flax's variable names ('scale',
    'bias'; 'mean', 'var'), so checkpoints and torchvision weights load unchanged.

    group_size > 0 is ghost BatchNorm (Hoffer et al. 2017): the batch is reshaped to (groups,
    group_size, ...) and each group is normalised by its own statistics, which is what unsynchronised
    BatchNorm computes with group_size examples per GPU (He et al.'s 2 GPUs x 64, Goyal et al.'s 32
    per GPU). A reshape is exact under jit whatever the sharding of the batch axis, and when the group
    size divides the per-device batch no group spans devices, so normalising needs no communication.
    The running averages follow the mean over groups of each group's statistics (PyTorch's
    DistributedDataParallel keeps rank 0's, one group's: the same expectation, more noise). With
    `unbiased`, each group's variance enters them times n / (n - 1), n its values per channel (PyTorch).
    """

    use_running_average: bool
    group_size: int = 0
    unbiased: bool = True
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Any = None
    scale_init: Callable = nn.initializers.ones

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        scale = self.param('scale', self.scale_init, (channels,), jnp.float32)
        bias = self.param('bias', nn.initializers.zeros, (channels,), jnp.float32)
        running_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros(channels, jnp.float32))
        running_var = self.variable('batch_stats', 'var', lambda: jnp.ones(channels, jnp.float32))
        if self.use_running_average:
            y = (x - running_mean.value) * (scale * jax.lax.rsqrt(running_var.value + self.epsilon)) + bias
            return y.astype(self.dtype or x.dtype)
        n = x.shape[0]
        size = self.group_size or n
        if n % size:
            raise ValueError(f'a batch of {n} examples does not split into BatchNorm groups of {size} '
                             '(model.bn_group_size); use a batch that it divides')
        groups = x.reshape((n // size, size) + x.shape[1:])
        normalize = batch_norm_onednn_grad if norm_by_onednn(groups) else batch_norm_train
        y, mean, var = normalize(groups, scale, bias, self.epsilon)
        if not self.is_initializing():
            count = groups[0].size // channels
            correction = count / max(count - 1, 1) if self.unbiased else 1.0
            m = self.momentum
            running_mean.value = m * running_mean.value + (1 - m) * mean.reshape(-1, channels).mean(0)
            running_var.value = m * running_var.value + (1 - m) * correction * var.reshape(-1, channels).mean(0)
        return y.reshape(x.shape).astype(self.dtype or x.dtype)


def norm_layer(design: BlockDesign, train: bool, name: str, zero_scale: bool = False):
    """The configured normalisation, or the identity when the design has none."""
    scale_init = nn.initializers.zeros if zero_scale else nn.initializers.ones
    if design.norm == 'batch':
        return BatchNorm(use_running_average=not train, group_size=design.bn_group_size,
                         unbiased=design.bn_running_var == 'unbiased', dtype=design.compute_dtype,
                         scale_init=scale_init, name=name)
    if design.norm == 'group':
        return nn.GroupNorm(num_groups=design.norm_groups, epsilon=1e-5,
                            dtype=design.compute_dtype, scale_init=scale_init, name=name)
    return lambda h: h


def spatial_axes(x) -> tuple[int, ...]:
    """The axes between batch and channels: (1, 2) for NHWC, (1, 2, 3) for NTHWC."""
    return tuple(range(1, x.ndim - 1))


def max_pool_3x3(x):
    """The ImageNet stems' 3x3/2 max pool with padding 1 over every spatial axis (torchvision's)."""
    dims = x.ndim - 2
    if dims == 2 and x.dtype == jnp.float32 and jax.default_backend() == 'cpu':
        return cpu_conv.max_pool_3x3_2d(x)
    return nn.max_pool(x, (3,) * dims, (2,) * dims, padding=[(1, 1)] * dims)


def avg_pool_2x2(x, stride: int = 2, dilation: int = 1, dilated_pool: str = 'timm'):
    """2x2/2 average pooling over every spatial axis that keeps a trailing odd row/column (ceil
    mode, padding not counted). In a stage whose stride became dilation it runs at stride 1:
    'a_trous' dilates its window like the stage's first conv, so that output j averages inputs j
    and j + dilation, what the strided pool averaged, on the finer grid; 'timm' averages j and
    j + 1 with a zero appended after the last row/column and counted, as timm's ResNet-D."""
    axes = spatial_axes(x)
    if stride == 1 and dilated_pool == 'timm':
        dilation = 1
    pad = [(0, 0)] + [(0, dilation if stride == 1 else x.shape[a] % 2) for a in axes] + [(0, 0)]
    window, strides, window_dilation = ((1,) + (v,) * len(axes) + (1,) for v in (2, stride, dilation))

    def window_sum(v):
        # A concrete zero lets JAX see a window sum, which reverse-mode autodiff supports.
        return jax.lax.reduce_window(v, np.zeros((), v.dtype), jax.lax.add, window, strides, pad,
                                     window_dilation=window_dilation)

    if stride == 1 and dilated_pool == 'timm':
        return window_sum(x) / 2 ** len(axes)
    return window_sum(x) / window_sum(jnp.ones(x.shape[:-1] + (1,), x.dtype))


class SqueezeExcite(nn.Module):
    """Channel attention (Hu et al.): rescale each channel by a gate computed from its mean."""

    hidden: int
    dtype: Any

    @nn.compact
    def __call__(self, x):
        dims = x.ndim - 2
        s = x.mean(axis=spatial_axes(x), keepdims=True)
        s = nn.relu(conv(self.hidden, 1, name='reduce', dtype=self.dtype, dims=dims, use_bias=True)(s))
        s = conv(x.shape[-1], 1, name='expand', dtype=self.dtype, dims=dims, use_bias=True)(s)
        return x * nn.sigmoid(s)


class Dropout(nn.Module):
    """Dropout whose rate may be a traced scalar (a population member's), with Flax's arithmetic.

    It carries nn.Dropout's class name so that Flax auto-names it `Dropout_<k>` and it draws the
    random stream an nn.Dropout in its place draws: a network without population members computes
    what it computed with nn.Dropout, and a member drops what a standalone run at its rate drops."""

    rate: Any
    broadcast_dims: tuple[int, ...] = ()
    deterministic: bool = False

    @nn.compact
    def __call__(self, x):
        static = isinstance(self.rate, (int, float))
        if self.deterministic or (static and self.rate == 0):
            return x
        keep = 1.0 - self.rate
        shape = [1 if axis in self.broadcast_dims else size for axis, size in enumerate(x.shape)]
        mask = jnp.broadcast_to(jax.random.bernoulli(self.make_rng('dropout'), keep, shape), x.shape)
        return jax.lax.select(mask, x / (keep if static else keep.astype(x.dtype)), jnp.zeros_like(x))


def preactivate(h, design: BlockDesign, train: bool, name: str):
    """What a pre-activation placement puts before each conv of a branch and before the head."""
    if design.placement == 'preact':
        return design.act(norm_layer(design, train, name)(h))
    if design.placement == 'relu_preact':
        return design.act(h)
    return h


@dataclasses.dataclass(frozen=True)
class BranchInit:
    """How a branch starts (`BlockDesign.branch_init`): He init; its last layer at zero (zero_gamma:
    the last norm's scale, or the last conv where no norm follows it); a scalar gain at zero
    (skipinit, = ReZero); or Fixup (zero last conv, He init scaled down by depth, scalar biases and a
    scalar multiplier). Kept apart so that the branch reads the same under every scheme."""

    scheme: str
    convs: int  # convs per branch
    num_blocks: int  # residual branches in the network; Fixup scales by it
    dtype: Any

    @property
    def zero_last(self) -> bool:
        """Whether the branch's last layer starts at zero, so that the block starts as its shortcut."""
        return self.scheme in ('zero_gamma', 'fixup')

    def kernel_init(self, last: bool, norm_follows: bool):
        """A conv's kernel initialiser; `norm_follows`: a norm whose scale can be zeroed instead."""
        if last and self.zero_last and not norm_follows:
            return nn.initializers.zeros
        if self.scheme == 'fixup':
            # Fixup rescales He init by L^(-1/(2m-2)) for m layers per branch; variance squares it.
            scale = self.num_blocks ** (-2.0 / (2 * self.convs - 2))
            return nn.initializers.variance_scaling(2.0 * scale, 'fan_out', 'normal')
        return conv_init

    def before_conv(self, block: nn.Module, h, i: int):
        """Fixup's scalar bias in front of conv i."""
        return h + self._scalar(block, f'bias{i}a', 0.0) if self.scheme == 'fixup' else h

    def after_conv(self, block: nn.Module, h, i: int, last: bool):
        """Fixup's scalar bias after conv i, after its scalar multiplier on the last conv."""
        if self.scheme != 'fixup':
            return h
        if last:
            h = h * self._scalar(block, 'scale', 1.0)
        return h + self._scalar(block, f'bias{i}b', 0.0)

    def gain(self, block: nn.Module, f):
        """SkipInit's scalar gain on the whole branch."""
        return f * self._scalar(block, 'branch_gain', 0.0) if self.scheme == 'skipinit' else f

    def _scalar(self, block: nn.Module, name: str, init: float):
        return block.param(name, nn.initializers.constant(init), (), jnp.float32).astype(self.dtype)


class ResidualBlock(nn.Module):
    """One block: y = combine(shortcut(x), branch(x)), with norms and activations placed
    as `design.placement` says and the skip path doing what `design.skip` says."""

    planes: int
    stride: int
    design: BlockDesign
    drop_path_rate: float = 0.0
    num_blocks: int = 1  # residual branches in the whole network; Fixup scales by it
    # Dilation of the convs after the one that carries (or, dilated, would carry) the stride, and of
    # that conv and those before it; in the first block of a dilated stage the latter is the previous
    # stage's dilation (torchvision's replace_stride_with_dilation). None: the same as `dilation`.
    dilation: int = 1
    first_dilation: int | None = None

    @nn.compact
    def __call__(self, x, train: bool = False, keep=None, grad_route=None, member=None):
        """keep, grad_route: analysis hooks (None: no change). `keep` scales the branch where it joins
        the shortcut (0 deletes the block; a plain block becomes the identity when its shape allows).
        `grad_route` changes only the backward pass: the gradient into the branch is scaled by it and
        the gradient into the shortcut by 1 - grad_route (1: branch only, 0: shortcut only).
        member: one population member's values of `design.member_keys()` (traced scalars; see
        `split_member`), each overriding the design's; drop_path_rate is this block's own rate."""
        member = self._check_member(member)
        f, shared = self._branch(x, train, member)
        return self._combine(x, shared, f, train, keep, grad_route, member)

    @property
    def convs(self) -> list[tuple[int, int, int, int]]:
        """(features, kernel size, stride, groups) of each conv of the branch."""
        return self.design.branch_convs(self.planes, self.stride)

    def _branch(self, x, train: bool, member):
        """The branch, and the (pre-activated) input it shares with a projection shortcut."""
        d = self.design
        init = BranchInit(d.branch_init, len(self.convs), self.num_blocks, d.compute_dtype)
        # The conv that carries a strided block's stride: dilation changes after it.
        stride_site = next(i for i, c in enumerate(d.branch_convs(self.planes, 2), start=1) if c[2] == 2)
        h = x
        for i, (features, kernel, stride, groups) in enumerate(self.convs, start=1):
            last = i == len(self.convs)
            h = init.before_conv(self, preactivate(h, d, train, f'norm{i}'), i)
            if i == 1:
                shared = h
            if last:
                h = self._dropout(h, 'dropout_rate', d.dropout_rate, train, member)
            norm_after = d.norm_after_conv(last)
            h = conv(features, kernel, stride, groups, name=f'conv{i}', dtype=d.compute_dtype, dims=x.ndim - 2,
                     dilation=self._first_dilation if i <= stride_site else self.dilation,
                     kernel_init=init.kernel_init(last, norm_after and d.norm != 'none'))(h)
            if norm_after:
                h = norm_layer(d, train, f'norm{i}', zero_scale=last and init.zero_last)(h)
            h = init.after_conv(self, h, i, last)
            if d.act_after_conv(last):
                h = d.act(h)
        if d.se_ratio:
            h = SqueezeExcite(d.se_width(h.shape[-1]), d.compute_dtype, name='se')(h)
        h = init.gain(self, h)
        h = self._dropout(h, 'drop_path_rate', self.drop_path_rate, train, member,
                          broadcast_dims=tuple(range(1, x.ndim)))
        return h, shared

    def _combine(self, x, shared, f, train: bool, keep, grad_route, member):
        """The skip path joined with the branch f, then what the placement puts after the addition."""
        d = self.design
        if grad_route is not None:  # forward values are unchanged (exactly, for 0 and 1)
            f = grad_route * f + (1 - grad_route) * jax.lax.stop_gradient(f)
        if keep is not None and d.skip != 'none':
            f = keep * f
        if d.skip == 'none':
            out = f
        else:
            s = self._shortcut(x, shared, f.shape[-1], train)
            if grad_route is not None:
                s = (1 - grad_route) * s + grad_route * jax.lax.stop_gradient(s)
            self.sow('intermediates', 'shortcut', s)
            s, f = self._skip(x, s, f, train, member)
            out = s + f
        self.sow('intermediates', 'branch', f)
        if d.placement == 'bn_after_add':
            out = norm_layer(d, train, f'norm{len(self.convs)}')(out)
        if d.placement in ('post', 'bn_after_add'):
            out = d.act(out)
        if keep is not None and d.skip == 'none' and out.shape == x.shape:
            out = keep * out + (1 - keep) * x
        self.sow('intermediates', 'output', out)
        return out

    def _skip(self, x, s, f, train: bool, member):
        """(shortcut, branch) as the skip mode weighs them before they are added."""
        d = self.design
        if d.skip == 'scale':
            s, f = self._value('skip_scale', member) * s, self._value('branch_scale', member) * f
        elif d.skip in ('exclusive_gate', 'shortcut_gate'):
            bias_init = nn.initializers.constant(member.get('gate_bias_init', d.gate_bias_init))
            g = nn.sigmoid(conv(f.shape[-1], 1, self.stride, name='gate', dtype=d.compute_dtype, dims=x.ndim - 2,
                                use_bias=True, bias_init=bias_init)(x))
            s = (1 - g) * s
            if d.skip == 'exclusive_gate':
                f = g * f
        elif d.skip == 'dropout':
            s = self._dropout(s, 'skip_dropout', d.skip_dropout, train, member)
        if 'skip_gain' in member:
            s = self._value('skip_gain', member) * s
        return s, f

    def _check_member(self, member) -> dict:
        allowed = self.design.member_keys()
        for key in member or {}:
            if key not in allowed:
                raise ValueError(f'member value {key!r} does not apply to skip={self.design.skip!r}; '
                                 f'allowed: {", ".join(allowed)}')
        return member or {}

    def _value(self, key: str, member):
        """The member's value for `key` in the compute dtype, or the design's."""
        return jnp.asarray(member[key], self.design.compute_dtype) if key in member else getattr(self.design, key)

    def _dropout(self, h, key: str, rate: float, train: bool, member, broadcast_dims=()):
        """Dropout at the member's rate for `key` when it has one, else at `rate` (0: none)."""
        rate = member.get(key, rate)
        if key not in member and not rate:
            return h
        return Dropout(rate, broadcast_dims, deterministic=not train)(h)

    @property
    def _first_dilation(self) -> int:
        return self.dilation if self.first_dilation is None else self.first_dilation

    def _shortcut(self, x, shared, out_features: int, train: bool):
        """The skip path before the skip mode weighs it: x itself, option A's subsampled and
        zero-padded x, or a projection of `shared` (the input the branch's first conv read)."""
        d = self.design
        dims = x.ndim - 2
        # A block whose stride became dilation reshapes as the strided block did, on a finer grid.
        downsamples = self.stride != 1 or self.dilation != self._first_dilation
        reshaped = downsamples or x.shape[-1] != out_features
        if d.skip == 'conv':  # Identity Mappings, Table 1: a 1x1 conv on every shortcut
            return conv(out_features, 1, self.stride, name='shortcut_conv', dtype=d.compute_dtype,
                        dims=dims)(shared)
        if d.shortcut == 'C' or (reshaped and d.shortcut in ('B', 'D')):
            s, stride = shared, self.stride
            if d.shortcut == 'D' and downsamples:
                s, stride = avg_pool_2x2(s, stride, self._first_dilation, d.dilated_pool), 1
            s = conv(out_features, 1, stride, name='shortcut_conv', dtype=d.compute_dtype, dims=dims)(s)
            if d.branch_ends_with_norm:
                s = norm_layer(d, train, 'shortcut_norm')(s)
            return s
        if reshaped:  # option A: strided subsampling, channels zero-padded; no parameters
            s = x[(slice(None),) + (slice(None, None, self.stride),) * dims]
            return jnp.pad(s, [(0, 0)] * (dims + 1) + [(0, out_features - x.shape[-1])])
        return x


class ResNet(nn.Module):
    """Stem, stages of `ResidualBlock`s built from `design`, global average pool, linear head.

    stage_sizes: blocks per stage; widths: each stage's planes (before bottleneck expansion);
    the first stage keeps the stem's resolution and each later one halves it.
    stem: 'imagenet' (7x7/2 conv + 3x3/2 max pool), 'deep' (three 3x3 convs + max pool,
      ResNet-C/D), 'cifar' (one 3x3 conv) or 'r3d' (video: a (3,7,7) conv at stride (1,2,2));
      stem_width is its output channels.
    width_multiplier: the Wide ResNet factor k applied to every stage's planes.
    remat: recompute each block's activations in the backward pass instead of storing them,
      trading about one extra forward pass for memory (larger batches, deeper nets).
    spatial_dims: 2 for images (NHWC input), 3 for video (NTHWC; 3x3x3 convs, stems 'r3d' or 'cifar').
    output_stride: the stride of the last stage's output (None: the natural one, 32 for ImageNet
      stems); smaller values replace the stride of the last stages by dilation (DeepLab; torchvision's
      replace_stride_with_dilation). `output_strides` lists the allowed values.
    output: 'logits'; 'features', a dict {'C<k>': stage output} for detection/segmentation heads, with
      strides in `feature_strides` (no head parameters); or 'pooled', the (N, C) vector the head reads.
    head_init_std: 0 initialises the classifier kernel as PyTorch's nn.Linear does; > 0 draws it from
      N(0, head_init_std^2) (Goyal et al. and fb.resnet.torch: 0.01). Its bias starts at zero either way.
    """

    num_classes: int = 1000
    stage_sizes: tuple[int, ...] = (2, 2, 2, 2)
    widths: tuple[int, ...] = (64, 128, 256, 512)
    stem: str = 'imagenet'
    stem_width: int = 64
    width_multiplier: int = 1
    remat: bool = False
    spatial_dims: int = 2
    output_stride: int | None = None
    output: str = 'logits'
    head_init_std: float = 0.0
    design: BlockDesign = BlockDesign()

    def __post_init__(self):
        super().__post_init__()
        check_choice('stem', self.stem, STEMS)
        check_choice('spatial_dims', self.spatial_dims, tuple(STEMS_BY_DIMS))
        check_choice('output', self.output, OUTPUTS)
        if self.stem not in STEMS_BY_DIMS[self.spatial_dims]:
            raise ValueError(f'stem={self.stem!r} does not exist with spatial_dims={self.spatial_dims}; choose '
                             'one of: ' + ', '.join(repr(s) for s in STEMS_BY_DIMS[self.spatial_dims]))
        if len(self.stage_sizes) != len(self.widths) or not self.stage_sizes:
            raise ValueError(f'stage_sizes={tuple(self.stage_sizes)} and widths={tuple(self.widths)} '
                             'must be non-empty and of the same length (one entry per stage)')
        for field in ('num_classes', 'stem_width', 'width_multiplier'):
            if getattr(self, field) < 1:
                raise ValueError(f'{field}={getattr(self, field)!r} must be a positive integer')
        if self.head_init_std < 0 or (self.head_init_std and self.design.branch_init == 'fixup'):
            raise ValueError(f'head_init_std={self.head_init_std!r} must be >= 0 (0: PyTorch\'s default), and 0 '
                             "with branch_init='fixup', whose head starts at zero")
        if min(self.stage_sizes) < 1 or min(self.widths) < 1:
            raise ValueError(f'stage_sizes={tuple(self.stage_sizes)} and widths={tuple(self.widths)} '
                             'must hold positive integers')
        if self.design.norm == 'group' and self.stem_width % self.design.norm_groups:
            raise ValueError(f'norm_groups={self.design.norm_groups} does not divide the stem width '
                             f'{self.stem_width}; use a divisor of it')
        in_channels = self.stem_width
        for stage, planes in enumerate(self.stage_planes, start=1):
            for block in range(self.stage_sizes[stage - 1]):
                self.design.check_widths(in_channels, planes, f'stage {stage}, block {block}')
                in_channels = self.design.out_channels(planes)
        if self.output_stride is not None and self.output_stride not in self.output_strides:
            raise ValueError(f'output_stride={self.output_stride!r} is not possible for stem={self.stem!r} '
                             f'with {len(self.stage_sizes)} stages; choose one of: '
                             + ', '.join(map(str, self.output_strides)))

    @property
    def stage_planes(self) -> tuple[int, ...]:
        """Each stage's planes after the Wide ResNet factor: what its blocks are built with."""
        return tuple(w * self.width_multiplier for w in self.widths)

    @property
    def output_strides(self) -> tuple[int, ...]:
        """Allowed output_stride values: the natural stride halved once per dilated stage, for up to
        every stage but the first (32, 16, 8, 4 for ImageNet stems; 4, 2, 1 for the CIFAR stem)."""
        natural = self._stem_strides[-1] * 2 ** (len(self.stage_sizes) - 1)
        return tuple(natural // 2 ** k for k in range(len(self.stage_sizes)))

    @property
    def stage_layout(self) -> list[tuple[int, int, int]]:
        """(stride, first-block dilation, dilation) of each stage. A dilated stage keeps stride 1
        and multiplies the dilation by the stride it replaces; its first block keeps the previous
        stage's dilation up to the conv that carried the stride (torchvision's semantics)."""
        natural = self.output_strides[0]
        dilated = int(math.log2(natural // (self.output_stride or natural)))
        layout, dilation = [], 1
        for stage in range(len(self.stage_sizes)):
            stride, previous = (1 if stage == 0 else 2), dilation
            if stage >= len(self.stage_sizes) - dilated:
                stride, dilation = 1, dilation * stride
            layout.append((stride, previous, dilation))
        return layout

    @property
    def feature_strides(self) -> dict[str, tuple[int, ...]]:
        """{'C<k>': stride of that stage's output along each spatial axis}, in stage order. C<k> is
        the stage whose output has stride 2^k along height and width without dilation (C2..C5 for
        ImageNet stems, C0..C2 for the CIFAR stem, C1..C4 for 'r3d'); the strides include dilation."""
        strides, current, nominal = {}, self._stem_strides, self._stem_strides[-1]
        for stage, (stride, _, _) in enumerate(self.stage_layout):
            nominal *= 1 if stage == 0 else 2
            current = tuple(c * stride for c in current)
            strides[f'C{int(math.log2(nominal))}'] = current
        return strides

    @property
    def _stem_strides(self) -> tuple[int, ...]:
        """The stem's total stride along each spatial axis (time first for video)."""
        _, conv_strides, max_pool = STEM_LAYOUTS[self.stem]
        total = (2 if max_pool else 1,) * self.spatial_dims
        for stride in conv_strides:
            total = tuple(t * s for t, s in zip(total, _per_dim(stride, self.spatial_dims)))
        return total

    @property
    def block_names(self) -> list[str]:
        """Names of the residual blocks, in the order the input flows through them."""
        return [f'stage{s}_block{b}' for s, n in enumerate(self.stage_sizes, start=1) for b in range(n)]

    @nn.compact
    def __call__(self, x, train: bool = False, keep=None, grad_route=None, member=None):
        """keep, grad_route: optional per-block arrays of shape (L,) for analysis (lesions, Veit et al.'s
        paths); block l gets entry l (see `ResidualBlock.__call__`). None leaves the network unchanged.

        member: one population member's design values, {key: scalar} with keys from
        `design.member_keys()` (see `design.split_member`), overriding the design's so that one traced
        network serves every member of a vmapped population; drop_path_rate is the network's rate,
        which block l of L scales by l / L. None: the design's values, computed as without the hook."""
        d = self.design
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(f'this ResNet has spatial_dims={self.spatial_dims} and takes '
                             f'{"NHWC" if self.spatial_dims == 2 else "NTHWC"} input; got shape {x.shape}')
        x = self._stem(x.astype(d.compute_dtype), train)
        self.sow('intermediates', 'stem', x)
        names = self.block_names
        block_class = nn.remat(ResidualBlock, static_argnums=(2,)) if self.remat else ResidualBlock
        gates = [None if g is None else jnp.asarray(g, d.compute_dtype) for g in (keep, grad_route)]
        index, features = 0, {}
        for planes, size, level, (stride, first_dilation, dilation) in zip(
                self.stage_planes, self.stage_sizes, self.feature_strides, self.stage_layout):
            for block in range(size):
                x = block_class(planes, stride if block == 0 else 1, d,
                                  drop_path_rate=d.drop_path_rate * (index + 1) / len(names),
                                  num_blocks=len(names), dilation=dilation, name=names[index],
                                  first_dilation=first_dilation if block == 0 else dilation)(
                    x, train, *(None if g is None else g[index] for g in gates),
                    _block_member(member, index + 1, len(names)))
                index += 1
            features[level] = x
        x = preactivate(x, d, train, 'final_norm')
        if self.output == 'features':
            features[level] = x  # the last stage as the head would see it (pre-activation: normalised)
            return features
        x = x.mean(axis=spatial_axes(x))
        fixup = d.branch_init == 'fixup'
        if fixup:
            x = x + self.param('head_bias_in', nn.initializers.zeros, (), jnp.float32).astype(x.dtype)
        if self.output == 'pooled':
            return x.astype(jnp.float32)
        head_init = nn.initializers.zeros if fixup else (
            nn.initializers.normal(self.head_init_std) if self.head_init_std else dense_init)
        x = nn.Dense(self.num_classes, kernel_init=head_init, dtype=d.compute_dtype, name='head')(x)
        return x.astype(jnp.float32)

    def _stem(self, x, train: bool):
        d = self.design
        # A CIFAR pre-activation net starts with a bare conv: its first block pre-activates.
        bare = self.stem == 'cifar' and d.preact
        kernel, strides, max_pool = STEM_LAYOUTS[self.stem]
        # One conv to stem_width, or (deep) two at half the width before it.
        widths = [self.stem_width // 2] * (len(strides) - 1) + [self.stem_width]
        for i, (features, stride) in enumerate(zip(widths, strides), start=1):
            suffix = str(i) if len(widths) > 1 else ''
            x = conv(features, kernel, stride, name=f'stem_conv{suffix}', dtype=d.compute_dtype,
                     dims=self.spatial_dims)(x)
            if bare:
                continue
            x = norm_layer(d, train, f'stem_norm{suffix}')(x)
            if d.branch_init == 'fixup':
                x = x + self.param(f'stem_bias{suffix}', nn.initializers.zeros, (), jnp.float32).astype(x.dtype)
            x = d.act(x)
        if max_pool:
            x = max_pool_3x3(x)
        return x


def _block_member(member, position: int, blocks: int):
    """Block `position` of `blocks`' member values: the network's drop-path rate times l / L."""
    if member is None or 'drop_path_rate' not in member:
        return member
    return {**member, 'drop_path_rate': member['drop_path_rate'] * position / blocks}


def residual_stream(model: ResNet, variables, x) -> list[jax.Array]:
    """[h_0, h_1, ..., h_L]: the stem output and every block's output, in order (eval mode)."""
    _, state = model.apply(variables, x, train=False, mutable=['intermediates'])
    inter = state['intermediates']
    return [inter['stem'][0]] + [inter[name]['output'][0] for name in model.block_names]


def param_count(params) -> int:
    """Number of scalars in a pytree of parameters (trainable ones when given 'params')."""
    return int(sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))
