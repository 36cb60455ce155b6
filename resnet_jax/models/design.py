"""The skip-connection design space as one frozen value, checked when it is built.

Every residual block of a network is assembled from the choices held in a `BlockDesign`
(docs/design.md, principle 4). Keeping them in one hashable dataclass lets the `ResNet` module
pass them to its blocks unchanged and lets the registry route command-line overrides to
the right place. Invalid values fail here, before any tracing or compilation.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax.numpy as jnp

from resnet_jax.errors import check_choice

BLOCKS = ('basic', 'bottleneck')
# How the shortcut changes shape (He et al. 2016; Bag of Tricks for ResNet-D):
# A zero-pads channels after strided subsampling, B projects only when the shape changes,
# C always projects, D average-pools before projecting.
SHORTCUTS = ('A', 'B', 'C', 'D')
# What the skip path does (Identity Mappings, Table 1).
SKIPS = ('identity', 'none', 'scale', 'exclusive_gate', 'shortcut_gate', 'conv', 'dropout')
# Where normalisation and activation sit (Identity Mappings, Table 2 / Figure 4).
PLACEMENTS = ('post', 'bn_after_add', 'relu_before_add', 'relu_preact', 'preact')
PREACT_PLACEMENTS = ('preact', 'relu_preact')
# How a branch starts: He init, zero-init of its last layer (Goyal et al.),
# a scalar branch gain initialised at zero (SkipInit / ReZero), or Fixup.
BRANCH_INITS = ('standard', 'zero_gamma', 'skipinit', 'fixup')
NORMS = ('batch', 'group', 'none')
# How a ResNet-D shortcut pools in a block whose stride became dilation: 'timm' as timm's ResNet-D
# (a 2x2 window at stride 1, zeros appended after the last row/column and counted), 'a_trous' with
# the window dilated like the stage's first conv and padding not counted, so that the dilated
# network computes the strided one on a finer grid.
DILATED_POOLS = ('timm', 'a_trous')
# The running variance BatchNorm keeps for evaluation: n/(n-1) times the batch variance (PyTorch, Caffe,
# Torch7) or the batch variance itself (Flax's default).
BN_RUNNING_VARS = ('unbiased', 'biased')
ACTIVATIONS = {
    'relu': nn.relu,
    'gelu': nn.gelu,
    'silu': nn.silu,
    'elu': nn.elu,
    'leaky_relu': nn.leaky_relu,
    'tanh': nn.tanh,
    'softplus': nn.softplus,
}
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}

# Bottleneck blocks widen their output by this factor (He et al. 2016).
BOTTLENECK_EXPANSION = 4

# The design fields that may differ between the members of one population (one vmapped network):
# they change no parameter shape and no control flow. `skip` only between 'identity' and 'none' with
# option A shortcuts, where a plain block is its residual twin with the shortcut multiplied by 0.
MEMBER_FIELDS = ('skip', 'skip_scale', 'branch_scale', 'gate_bias_init', 'skip_dropout', 'dropout_rate',
                 'drop_path_rate')
# The member values each skip mode reads; 'skip_gain' multiplies the shortcut (1: the residual net,
# 0: its plain twin). gate_bias_init only acts when the parameters are initialised.
SKIP_MEMBER_KEYS = {
    'identity': ('skip_gain',),
    'scale': ('skip_scale', 'branch_scale'),
    'exclusive_gate': ('gate_bias_init',),
    'shortcut_gate': ('gate_bias_init',),
    'dropout': ('skip_dropout',),
}


def check_rate(field: str, value: float) -> None:
    """Refuse a rate outside [0, 1), where dropout is defined and keeps something."""
    if not 0.0 <= value < 1.0:
        raise ValueError(f'{field}={value!r} is outside the allowed range [0, 1)')


def check_positive(field: str, value: int) -> None:
    """Refuse a count or width below 1, which would build a layer with no channels or groups."""
    if value < 1:
        raise ValueError(f'{field}={value!r} must be a positive integer')


# BlockDesign's fields carry their own check (field name, value) -> None, run when a design is built, so each
# rule is read beside its field.
def _choice(default: str, allowed) -> dataclasses.Field:
    """A field whose value must be one of `allowed` (a tuple, or a dict's keys)."""
    check = functools.partial(check_choice, allowed=tuple(allowed))
    return dataclasses.field(default=default, metadata={'check': check})


def _rate(default: float) -> dataclasses.Field:
    """A dropout-like rate field, checked by check_rate."""
    return dataclasses.field(default=default, metadata={'check': check_rate})


def _positive(default: int) -> dataclasses.Field:
    """A count or width field, checked by check_positive."""
    return dataclasses.field(default=default, metadata={'check': check_positive})


@dataclasses.dataclass(frozen=True)
class BlockDesign:
    """The choices that define every residual block of a network.

    block: 'basic' (two 3x3 convs) or 'bottleneck' (1x1, 3x3, 1x1 with 4x expansion).
    cardinality, base_width: grouped 3x3 convs; a bottleneck's inner width is
      planes * base_width / 64 * cardinality (ResNeXt; base_width 128 gives Wide ResNet-50-2).
    stride_in_1x1: put a bottleneck's stride on its first 1x1 (ResNet v1) instead of the 3x3 (v1.5).
    shortcut: 'A' | 'B' | 'C' | 'D', the shortcut used when the shape changes (C: always).
    skip: what the skip path does; skip_scale/branch_scale are used by 'scale',
      gate_bias_init by the two gates, skip_dropout by 'dropout'.
    placement: where normalisation and activation sit relative to the addition.
    branch_init: 'standard', 'zero_gamma', 'skipinit' (= ReZero) or 'fixup'.
    dropout_rate: dropout before the last conv of each branch (Wide ResNet).
    drop_path_rate: stochastic depth; block l of L drops its branch with rate * l / L.
    se_ratio: squeeze-and-excitation hidden width as a fraction of the channels (0 = off).
    se_divisor: the hidden width is channels * se_ratio rounded to the nearest multiple of this,
      halves up, and at least this (timm's make_divisible; its SE-ResNets use 8).
    dilated_pool: a ResNet-D shortcut's pool where a stride became dilation, one of DILATED_POOLS.
    norm, norm_groups: 'batch', 'group' (with norm_groups groups) or 'none'.
    bn_group_size: BatchNorm statistics over consecutive groups of this many examples (ghost BN,
      as unsynchronised per-GPU BN computes them); 0: over the whole batch.
    bn_running_var: 'unbiased' or 'biased', the variance BatchNorm's running average keeps.
    activation: a name from ACTIVATIONS.
    dtype: compute dtype; parameters stay float32.
    """

    block: str = _choice('basic', BLOCKS)
    cardinality: int = _positive(1)
    base_width: int = _positive(64)
    stride_in_1x1: bool = False
    shortcut: str = _choice('B', SHORTCUTS)
    skip: str = _choice('identity', SKIPS)
    skip_scale: float = 1.0
    branch_scale: float = 1.0
    gate_bias_init: float = 0.0
    skip_dropout: float = _rate(0.5)
    placement: str = _choice('post', PLACEMENTS)
    branch_init: str = _choice('standard', BRANCH_INITS)
    dropout_rate: float = _rate(0.0)
    drop_path_rate: float = _rate(0.0)
    se_ratio: float = 0.0
    se_divisor: int = _positive(1)
    dilated_pool: str = _choice('timm', DILATED_POOLS)
    norm: str = _choice('batch', NORMS)
    norm_groups: int = _positive(32)
    bn_group_size: int = 0
    bn_running_var: str = _choice('unbiased', BN_RUNNING_VARS)
    activation: str = _choice('relu', ACTIVATIONS)
    dtype: str = _choice('float32', DTYPES)

    def __post_init__(self):
        for field in dataclasses.fields(self):
            if 'check' in field.metadata:
                field.metadata['check'](field.name, getattr(self, field.name))
        if self.bn_group_size < 0 or (self.bn_group_size and self.norm != 'batch'):
            raise ValueError(f'bn_group_size={self.bn_group_size!r} must be >= 0 (0: the whole batch) and is only '
                             f"used with norm='batch' (got norm={self.norm!r})")
        if self.se_ratio < 0:
            raise ValueError(f'se_ratio={self.se_ratio!r} must be >= 0 (0 turns squeeze-and-excitation off)')
        if self.skip != 'scale' and (self.skip_scale != 1.0 or self.branch_scale != 1.0):
            raise ValueError(f"skip_scale/branch_scale are only used with skip='scale', not skip={self.skip!r}")
        if self.skip not in ('exclusive_gate', 'shortcut_gate') and self.gate_bias_init != 0.0:
            raise ValueError("gate_bias_init is only used with skip='exclusive_gate' or 'shortcut_gate', "
                             f'not skip={self.skip!r}')
        if self.branch_init == 'fixup' and (self.norm != 'none' or self.placement != 'post'):
            raise ValueError("branch_init='fixup' is defined for networks without normalisation in the "
                             f"original layout: it needs norm='none' and placement='post' "
                             f'(got norm={self.norm!r}, placement={self.placement!r})')

    @property
    def compute_dtype(self):
        """The jnp dtype activations are computed in (the field holds its name, to stay serialisable)."""
        return DTYPES[self.dtype]

    @property
    def act(self):
        """The activation function the `activation` name stands for."""
        return ACTIVATIONS[self.activation]

    @property
    def preact(self) -> bool:
        """Whether norms/activations come before each conv, so a projection reads the pre-activated input."""
        return self.placement in PREACT_PLACEMENTS

    @property
    def branch_ends_with_norm(self) -> bool:
        """Whether a norm follows the last conv of a branch (a projection shortcut then gets one too)."""
        return self.norm != 'none' and self.norm_after_conv(last=True)

    def norm_after_conv(self, last: bool) -> bool:
        """Whether the placement puts a norm right after a branch conv (`last`: the branch's last one;
        'bn_after_add' moves that one's norm after the addition)."""
        return self.placement in ('post', 'relu_before_add', 'relu_preact') or (
            self.placement == 'bn_after_add' and not last)

    def act_after_conv(self, last: bool) -> bool:
        """Whether the placement puts an activation right after a branch conv (and its norm); 'post' and
        'bn_after_add' activate the last conv's output only after the addition."""
        return (self.placement in ('post', 'bn_after_add') and not last) or self.placement == 'relu_before_add'

    def member_keys(self) -> tuple[str, ...]:
        """The values one member of a population may set through the model's `member` hook in a
        network of this (shared) design: those of its skip mode, then the two dropout rates."""
        return SKIP_MEMBER_KEYS.get(self.skip, ()) + ('dropout_rate', 'drop_path_rate')

    def se_width(self, channels: int) -> int:
        """The squeeze-and-excitation hidden width for `channels` (see se_divisor)."""
        d = self.se_divisor
        return max(d, int(channels * self.se_ratio + d / 2) // d * d)

    def branch_convs(self, planes: int, stride: int) -> list[tuple[int, int, int, int]]:
        """(features, kernel size, stride, groups) of each conv in a branch, in order."""
        if self.block == 'basic':
            return [(planes, 3, stride, self.cardinality), (planes, 3, 1, self.cardinality)]
        width = planes * self.base_width // 64 * self.cardinality
        stride_1x1, stride_3x3 = (stride, 1) if self.stride_in_1x1 else (1, stride)
        return [(width, 1, stride_1x1, 1), (width, 3, stride_3x3, self.cardinality),
                (planes * BOTTLENECK_EXPANSION, 1, 1, 1)]

    def out_channels(self, planes: int) -> int:
        """A block's output channels for `planes` (bottlenecks expand them)."""
        return planes * (BOTTLENECK_EXPANSION if self.block == 'bottleneck' else 1)

    def check_widths(self, in_channels: int, planes: int, where: str) -> None:
        """Fail on channel counts that grouped convs or group norm cannot split evenly."""
        if self.block == 'bottleneck' and planes * self.base_width % 64:
            raise ValueError(f'base_width={self.base_width} gives a fractional bottleneck width '
                             f'{planes} * {self.base_width} / 64 in {where}; choose a base_width '
                             f'that makes planes * base_width divisible by 64')
        out = self.out_channels(planes)
        if self.shortcut == 'A' and self.skip not in ('none', 'conv') and out < in_channels:
            raise ValueError(f"shortcut='A' zero-pads channels and cannot narrow {in_channels} -> {out} "
                             f"channels in {where}; use shortcut='B' or widths that do not shrink")
        convs = self.branch_convs(planes, 1)
        conv_inputs = [in_channels] + [features for features, *_ in convs[:-1]]
        for (features, _, _, groups), fan_in in zip(convs, conv_inputs):
            if fan_in % groups or features % groups:
                raise ValueError(f'cardinality={self.cardinality} does not divide the width of a '
                                 f'grouped conv in {where} ({fan_in} -> {features} channels); use a '
                                 f'cardinality that divides both')
            if self.norm == 'group' and features % self.norm_groups:
                raise ValueError(f'norm_groups={self.norm_groups} does not divide the {features} '
                                 f'channels of a normalised layer in {where}; use a divisor of it')


def split_member(design: BlockDesign) -> tuple[BlockDesign, dict[str, float]]:
    """(shared design, member values): the design with every member field at its neutral default,
    and the values that the model's `member` hook needs to compute `design` on that shared design.

    Two designs can train in one population exactly when their shared designs are equal: a plain net
    with option A shortcuts shares one with its ResNet twin (skip 'identity', skip_gain 0 or 1), a
    plain net whose shortcuts would project does not, as the twin has parameters it lacks."""
    plain_twin = design.skip == 'none' and design.shortcut == 'A'
    shared = dataclasses.replace(design, skip='identity') if plain_twin else design
    keys = shared.member_keys()
    values = {key: float(getattr(design, key)) for key in keys if key != 'skip_gain'}
    if 'skip_gain' in keys:
        values['skip_gain'] = 0.0 if plain_twin else 1.0
    defaults = {f.name: f.default for f in dataclasses.fields(BlockDesign) if f.name in values}
    return dataclasses.replace(shared, **defaults), {key: values[key] for key in keys}
