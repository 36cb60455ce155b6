"""The generic ResNet: one Flax module whose fields cover the published variants.

A network is a stem, stages of residual blocks and a linear head. Every block is built from
the same `BlockDesign`, so plain nets, pre-activation nets, gated skips, Fixup and the rest
are field values rather than classes. Layouts follow PyTorch conventions (symmetric padding
of (k - 1) / 2, BatchNorm momentum 0.1 in torch terms, epsilon 1e-5) so torchvision weights
convert exactly; tensors are NHWC.

Blocks `sow` what they computed into the 'intermediates' collection: 'output' (the residual
stream h_l), 'branch' (what the branch added) and 'shortcut'; the stem sows h_0 as 'stem'.
Nothing is stored unless the caller makes that collection mutable, so analysis needs no
second implementation of the network.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_jax.models.design import BlockDesign, check_choice

STEMS = ('imagenet', 'deep', 'cifar')

# He et al. initialisation as torchvision applies it, and torch's default for the classifier.
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
dense_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def conv(features: int, kernel: int, stride: int = 1, groups: int = 1, *, name: str,
         dtype: Any, kernel_init=conv_init, use_bias: bool = False,
         bias_init=nn.initializers.zeros) -> nn.Conv:
    """A conv with PyTorch's symmetric padding, so odd and even sizes match torchvision."""
    pad = (kernel - 1) // 2
    return nn.Conv(features, (kernel, kernel), (stride, stride), padding=[(pad, pad), (pad, pad)],
                   feature_group_count=groups, use_bias=use_bias, kernel_init=kernel_init,
                   bias_init=bias_init, dtype=dtype, name=name)


def norm_layer(design: BlockDesign, train: bool, name: str, zero_scale: bool = False):
    """The configured normalisation, or the identity when the design has none."""
    scale_init = nn.initializers.zeros if zero_scale else nn.initializers.ones
    if design.norm == 'batch':
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                            dtype=design.compute_dtype, scale_init=scale_init, name=name)
    if design.norm == 'group':
        return nn.GroupNorm(num_groups=design.norm_groups, epsilon=1e-5,
                            dtype=design.compute_dtype, scale_init=scale_init, name=name)
    return lambda h: h


def max_pool_3x3(x):
    return nn.max_pool(x, (3, 3), (2, 2), padding=[(1, 1), (1, 1)])


def avg_pool_2x2(x):
    """2x2/2 average pooling that keeps a trailing odd row/column (ceil mode, pad not counted)."""
    pad = [(0, x.shape[1] % 2), (0, x.shape[2] % 2)]
    return nn.avg_pool(x, (2, 2), (2, 2), padding=pad, count_include_pad=False)


class SqueezeExcite(nn.Module):
    """Channel attention (Hu et al.): rescale each channel by a gate computed from its mean."""

    hidden: int
    dtype: Any

    @nn.compact
    def __call__(self, x):
        s = x.mean(axis=(1, 2), keepdims=True)
        s = nn.relu(conv(self.hidden, 1, name='reduce', dtype=self.dtype, use_bias=True)(s))
        s = conv(x.shape[-1], 1, name='expand', dtype=self.dtype, use_bias=True)(s)
        return x * nn.sigmoid(s)


class ResidualBlock(nn.Module):
    """One block: y = combine(shortcut(x), branch(x)), with norms and activations placed
    as `design.placement` says and the skip path doing what `design.skip` says."""

    planes: int
    stride: int
    design: BlockDesign
    drop_path_rate: float = 0.0
    num_blocks: int = 1  # residual branches in the whole network; Fixup scales by it

    @nn.compact
    def __call__(self, x, train: bool = False):
        d = self.design
        dtype, act = d.compute_dtype, d.act
        convs = d.branch_convs(self.planes, self.stride)
        n = len(convs)
        out_features = convs[-1][0]
        fixup = d.branch_init == 'fixup'
        zero_last = d.branch_init in ('zero_gamma', 'fixup')

        def scalar(name, init):
            return self.param(name, nn.initializers.constant(init), (), jnp.float32).astype(dtype)

        # Ops on the block input that the branch and a projection shortcut share.
        h = x
        if d.placement == 'preact':
            h = act(norm_layer(d, train, 'norm1')(h))
        elif d.placement == 'relu_preact':
            h = act(h)
        if fixup:
            h = h + scalar('bias1a', 0.0)
        projection_input = h if (d.preact or fixup) else x

        for i, (features, kernel, stride, groups) in enumerate(convs, start=1):
            last = i == n
            if i > 1:
                if d.placement == 'preact':
                    h = act(norm_layer(d, train, f'norm{i}')(h))
                elif d.placement == 'relu_preact':
                    h = act(h)
                if fixup:
                    h = h + scalar(f'bias{i}a', 0.0)
            if last and d.dropout_rate:
                h = nn.Dropout(d.dropout_rate, deterministic=not train)(h)
            norm_after = d.placement in ('post', 'relu_before_add', 'relu_preact') or (
                d.placement == 'bn_after_add' and not last)
            zero_this_conv = last and zero_last and not (norm_after and d.norm != 'none')
            h = conv(features, kernel, stride, groups, name=f'conv{i}', dtype=dtype,
                     kernel_init=self._kernel_init(zero_this_conv, n))(h)
            if norm_after:
                h = norm_layer(d, train, f'norm{i}', zero_scale=last and zero_last)(h)
            if fixup and last:
                h = h * scalar('scale', 1.0) + scalar(f'bias{i}b', 0.0)
            elif fixup:
                h = h + scalar(f'bias{i}b', 0.0)
            act_after = (d.placement in ('post', 'bn_after_add') and not last) or (
                d.placement == 'relu_before_add')
            if act_after:
                h = act(h)

        f = h
        if d.se_ratio:
            f = SqueezeExcite(max(1, round(out_features * d.se_ratio)), dtype, name='se')(f)
        if d.branch_init == 'skipinit':
            f = f * scalar('branch_gain', 0.0)
        if self.drop_path_rate:
            f = nn.Dropout(self.drop_path_rate, broadcast_dims=(1, 2, 3), deterministic=not train)(f)

        if d.skip == 'none':
            out = f
        else:
            s = self._shortcut(x, projection_input, out_features, train)
            self.sow('intermediates', 'shortcut', s)
            if d.skip == 'scale':
                s, f = d.skip_scale * s, d.branch_scale * f
            elif d.skip in ('exclusive_gate', 'shortcut_gate'):
                g = nn.sigmoid(conv(out_features, 1, self.stride, name='gate', dtype=dtype, use_bias=True,
                                    bias_init=nn.initializers.constant(d.gate_bias_init))(x))
                s = (1 - g) * s
                if d.skip == 'exclusive_gate':
                    f = g * f
            elif d.skip == 'dropout':
                s = nn.Dropout(d.skip_dropout, deterministic=not train)(s)
            out = s + f
        self.sow('intermediates', 'branch', f)

        if d.placement == 'bn_after_add':
            out = norm_layer(d, train, f'norm{n}')(out)
        if d.placement in ('post', 'bn_after_add'):
            out = act(out)
        self.sow('intermediates', 'output', out)
        return out

    def _kernel_init(self, zero: bool, convs_per_branch: int):
        if zero:
            return nn.initializers.zeros
        if self.design.branch_init == 'fixup':
            # Fixup rescales He init by L^(-1/(2m-2)) for m layers per branch; variance squares it.
            scale = self.num_blocks ** (-2.0 / (2 * convs_per_branch - 2))
            return nn.initializers.variance_scaling(2.0 * scale, 'fan_out', 'normal')
        return conv_init

    def _shortcut(self, x, projection_input, out_features: int, train: bool):
        d = self.design
        reshaped = self.stride != 1 or x.shape[-1] != out_features
        if d.skip == 'conv':  # Identity Mappings, Table 1: a 1x1 conv on every shortcut
            return conv(out_features, 1, self.stride, name='shortcut_conv',
                        dtype=d.compute_dtype)(projection_input)
        if d.shortcut == 'C' or (reshaped and d.shortcut in ('B', 'D')):
            s, stride = projection_input, self.stride
            if d.shortcut == 'D' and stride > 1:
                s, stride = avg_pool_2x2(s), 1
            s = conv(out_features, 1, stride, name='shortcut_conv', dtype=d.compute_dtype)(s)
            if d.branch_ends_with_norm:
                s = norm_layer(d, train, 'shortcut_norm')(s)
            return s
        if reshaped:  # option A: strided subsampling, channels zero-padded; no parameters
            s = x[:, ::self.stride, ::self.stride, :]
            return jnp.pad(s, [(0, 0), (0, 0), (0, 0), (0, out_features - x.shape[-1])])
        return x


class ResNet(nn.Module):
    """Stem, stages of `ResidualBlock`s built from `design`, global average pool, linear head.

    stage_sizes: blocks per stage; widths: each stage's planes (before bottleneck expansion);
    the first stage keeps the stem's resolution and each later one halves it.
    stem: 'imagenet' (7x7/2 conv + 3x3/2 max pool), 'deep' (three 3x3 convs + max pool,
      ResNet-C/D) or 'cifar' (one 3x3 conv); stem_width is its output channels.
    width_multiplier: the Wide ResNet factor k applied to every stage's planes.
    remat: recompute each block's activations in the backward pass instead of storing them,
      trading about one extra forward pass for memory (larger batches, deeper nets).
    """

    num_classes: int = 1000
    stage_sizes: tuple[int, ...] = (2, 2, 2, 2)
    widths: tuple[int, ...] = (64, 128, 256, 512)
    stem: str = 'imagenet'
    stem_width: int = 64
    width_multiplier: int = 1
    remat: bool = False
    design: BlockDesign = BlockDesign()

    def __post_init__(self):
        super().__post_init__()
        check_choice('stem', self.stem, STEMS)
        if len(self.stage_sizes) != len(self.widths) or not self.stage_sizes:
            raise ValueError(f'stage_sizes={tuple(self.stage_sizes)} and widths={tuple(self.widths)} '
                             'must be non-empty and of the same length (one entry per stage)')
        for field in ('num_classes', 'stem_width', 'width_multiplier'):
            if getattr(self, field) < 1:
                raise ValueError(f'{field}={getattr(self, field)!r} must be a positive integer')
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

    @property
    def stage_planes(self) -> tuple[int, ...]:
        return tuple(w * self.width_multiplier for w in self.widths)

    @property
    def block_names(self) -> list[str]:
        """Names of the residual blocks, in the order the input flows through them."""
        return [f'stage{s}_block{b}' for s, n in enumerate(self.stage_sizes, start=1) for b in range(n)]

    @nn.compact
    def __call__(self, x, train: bool = False):
        d = self.design
        x = self._stem(x.astype(d.compute_dtype), train)
        self.sow('intermediates', 'stem', x)
        names = self.block_names
        block_class = nn.remat(ResidualBlock, static_argnums=(2,)) if self.remat else ResidualBlock
        index = 0
        for stage, (size, planes) in enumerate(zip(self.stage_sizes, self.stage_planes), start=1):
            for block in range(size):
                x = block_class(planes, 2 if stage > 1 and block == 0 else 1, d,
                                  drop_path_rate=d.drop_path_rate * (index + 1) / len(names),
                                  num_blocks=len(names), name=names[index])(x, train)
                index += 1
        if d.placement == 'preact':
            x = d.act(norm_layer(d, train, 'final_norm')(x))
        elif d.placement == 'relu_preact':
            x = d.act(x)
        x = x.mean(axis=(1, 2))
        fixup = d.branch_init == 'fixup'
        if fixup:
            x = x + self.param('head_bias_in', nn.initializers.zeros, (), jnp.float32).astype(x.dtype)
        head_init = nn.initializers.zeros if fixup else dense_init
        x = nn.Dense(self.num_classes, kernel_init=head_init, dtype=d.compute_dtype, name='head')(x)
        return x.astype(jnp.float32)

    def _stem(self, x, train: bool):
        d = self.design
        # A CIFAR pre-activation net starts with a bare conv: its first block pre-activates.
        bare = self.stem == 'cifar' and d.preact
        if self.stem == 'deep':
            widths = [(self.stem_width // 2, 2), (self.stem_width // 2, 1), (self.stem_width, 1)]
        else:
            widths = [(self.stem_width, 2 if self.stem == 'imagenet' else 1)]
        kernel = 7 if self.stem == 'imagenet' else 3
        for i, (features, stride) in enumerate(widths, start=1):
            suffix = str(i) if len(widths) > 1 else ''
            x = conv(features, kernel, stride, name=f'stem_conv{suffix}', dtype=d.compute_dtype)(x)
            if bare:
                continue
            x = norm_layer(d, train, f'stem_norm{suffix}')(x)
            if d.branch_init == 'fixup':
                x = x + self.param(f'stem_bias{suffix}', nn.initializers.zeros, (), jnp.float32).astype(x.dtype)
            x = d.act(x)
        if self.stem != 'cifar':
            x = max_pool_3x3(x)
        return x


def residual_stream(model: ResNet, variables, x) -> list[jax.Array]:
    """[h_0, h_1, ..., h_L]: the stem output and every block's output, in order (eval mode)."""
    _, state = model.apply(variables, x, train=False, mutable=['intermediates'])
    inter = state['intermediates']
    return [inter['stem'][0]] + [inter[name]['output'][0] for name in model.block_names]


def param_count(params) -> int:
    """Number of scalars in a pytree of parameters (trainable ones when given 'params')."""
    return int(sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))
