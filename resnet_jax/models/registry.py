"""Named presets: each one is a set of `ResNet` and `BlockDesign` field values.

`get_model('resnet56', skip='none')` builds a preset with any field overridden, so every
point of the design space between the presets is reachable by name plus overrides. A run's
config names its network the same way (`config.model`: a preset name and the fields it overrides);
`check_config` builds that network or says which field cannot.
"""

from __future__ import annotations

import dataclasses

from resnet_jax.errors import close_matches, refuse
from resnet_jax.models.design import BlockDesign
from resnet_jax.models.resnet import ResNet

IMAGENET = dict(stem='imagenet', stem_width=64, widths=(64, 128, 256, 512), num_classes=1000)
CIFAR = dict(stem='cifar', stem_width=16, widths=(16, 32, 64), num_classes=10, shortcut='A')
# Pre-activation nets on CIFAR project the shortcut with a bare 1x1 conv when the shape changes.
CIFAR_PREACT = dict(CIFAR, shortcut='B', placement='preact')
# Tran et al. 2018, R3D (torchvision's r3d_18): the ImageNet stages with 3x3x3 convs and 1x1x1
# projections, a (3,7,7)/(1,2,2) stem without max pool, Kinetics-400 classes; input NTHWC.
VIDEO = dict(IMAGENET, stem='r3d', spatial_dims=3, num_classes=400)

BASIC_STAGES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
BOTTLENECK_STAGES = {26: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3), 200: (3, 24, 36, 3)}


def _imagenet(depth: int, **fields) -> dict:
    stages = BASIC_STAGES.get(depth) or BOTTLENECK_STAGES[depth]
    block = 'basic' if depth in BASIC_STAGES else 'bottleneck'
    return dict(IMAGENET, stage_sizes=stages, block=block, **fields)


def _cifar(depth: int, block: str = 'basic', base=CIFAR, **fields) -> dict:
    """He et al.'s CIFAR nets: 6n+2 layers with basic blocks, 9n+2 with bottlenecks."""
    per_block = 2 if block == 'basic' else 3
    n = (depth - 2) // (3 * per_block)
    assert 3 * per_block * n + 2 == depth, depth
    return dict(base, stage_sizes=(n, n, n), block=block, **fields)


def _wide(depth: int, k: int) -> dict:
    """Zagoruyko & Komodakis: pre-activation basic blocks, depth 6n+4, widths 16k/32k/64k."""
    n = (depth - 4) // 6
    return dict(CIFAR_PREACT, stage_sizes=(n, n, n), block='basic', width_multiplier=k)


def _resnext29(cardinality: int, base_width: int) -> dict:
    """Xie et al.'s CIFAR ResNeXt-29: a 64-wide 3x3 stem and three stages of 3 bottlenecks."""
    return dict(CIFAR, shortcut='B', stem_width=64, widths=(64, 128, 256), stage_sizes=(3, 3, 3),
                block='bottleneck', cardinality=cardinality, base_width=base_width)


PRESETS: dict[str, dict] = {
    # He et al. 2016 on ImageNet, with the stride on the 3x3 (v1.5, torchvision's "ResNet-B").
    **{f'resnet{d}': _imagenet(d) for d in (18, 26, 34, 50, 101, 152, 200)},
    'resnet50_v1': _imagenet(50, stride_in_1x1=True),
    # Bag of Tricks: ResNet-C replaces the 7x7 stem by three 3x3s; ResNet-D adds avg-pool shortcuts.
    'resnet50_c': _imagenet(50, stem='deep'),
    **{f'resnet{d}_d': _imagenet(d, stem='deep', shortcut='D') for d in (18, 26, 34, 50, 101, 152, 200)},
    'resnext50_32x4d': _imagenet(50, cardinality=32, base_width=4),
    'resnext101_32x8d': _imagenet(101, cardinality=32, base_width=8),
    'resnext101_64x4d': _imagenet(101, cardinality=64, base_width=4),
    'wide_resnet50_2': _imagenet(50, base_width=128),
    'wide_resnet101_2': _imagenet(101, base_width=128),
    # Hu et al.'s SE blocks as timm builds them: hidden width make_divisible(channels / 16, 8).
    **{f'se_resnet{d}': _imagenet(d, se_ratio=1 / 16, se_divisor=8) for d in (18, 34, 50, 101, 152)},
    'se_resnext50_32x4d': _imagenet(50, cardinality=32, base_width=4, se_ratio=1 / 16, se_divisor=8),
    'se_resnext101_32x8d': _imagenet(101, cardinality=32, base_width=8, se_ratio=1 / 16, se_divisor=8),
    'plain18': _imagenet(18, skip='none'),
    'plain34': _imagenet(34, skip='none'),
    # He et al. 2016, CIFAR-10 Table 6: option A shortcuts, and the plain twins of Figure 6.
    **{f'resnet{d}': _cifar(d) for d in (20, 32, 44, 56, 110, 1202)},
    **{f'plain{d}': _cifar(d, skip='none') for d in (20, 32, 44, 56, 110)},
    # He et al. 2016b, Identity Mappings: full pre-activation.
    'preact_resnet110': _cifar(110, base=CIFAR_PREACT),
    'preact_resnet164': _cifar(164, 'bottleneck', base=CIFAR_PREACT),
    'preact_resnet1001': _cifar(1001, 'bottleneck', base=CIFAR_PREACT),
    'wrn16_8': _wide(16, 8),
    'wrn28_10': _wide(28, 10),
    'wrn40_4': _wide(40, 4),
    'resnext29_8x64d': _resnext29(8, 64),
    'resnext29_16x64d': _resnext29(16, 64),
    **{f'r3d_{d}': dict(VIDEO, stage_sizes=BASIC_STAGES[d], block='basic') for d in (18, 34)},
}

NETWORK_FIELDS = tuple(f.name for f in dataclasses.fields(ResNet) if f.name not in ('design', 'parent', 'name'))
DESIGN_FIELDS = tuple(f.name for f in dataclasses.fields(BlockDesign))


def list_models() -> list[str]:
    """Every preset name, sorted (for listings and error messages)."""
    return sorted(PRESETS)


def get_model(name: str, num_classes: int | None = None, **overrides) -> ResNet:
    """Build preset `name`, with any `ResNet` or `BlockDesign` field overridden by keyword."""
    if name not in PRESETS:
        raise ValueError(f'unknown model {name!r}.{close_matches(name, PRESETS)} '
                         f'Known models: {", ".join(list_models())}')
    fields = dict(PRESETS[name], **overrides)
    if num_classes is not None:
        fields['num_classes'] = num_classes
    unknown = [k for k in fields if k not in NETWORK_FIELDS + DESIGN_FIELDS]
    if unknown:
        raise ValueError(f'unknown model field {unknown[0]!r}.{close_matches(unknown[0], NETWORK_FIELDS + DESIGN_FIELDS)} '
                         f'Allowed fields: {", ".join(NETWORK_FIELDS + DESIGN_FIELDS)}')
    network = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items() if k in NETWORK_FIELDS}
    design = BlockDesign(**{k: v for k, v in fields.items() if k in DESIGN_FIELDS})
    return ResNet(design=design, **network)


def native_resolution(model: ResNet) -> int:
    """The input size a preset was published at: 32 for CIFAR stems, 112 for video nets (torchvision's
    Kinetics crop), 224 otherwise."""
    if model.stem == 'cifar':
        return 32
    return 112 if model.spatial_dims == 3 else 224


def model_overrides(config) -> dict:
    """The model fields that a run's config sets, for `get_model(config.model.name, **overrides)`."""
    return {k: v for k, v in config.model.items() if k != 'name' and v is not None}


def check_config(config) -> ResNet:
    """The network config.model describes; an unknown preset, a field value the design refuses, or a
    video network (the data pipelines feed images) is a ConfigError naming the field."""
    name = config.model.name
    if name not in PRESETS:
        refuse('model.name', f'unknown model {name!r}.{close_matches(name, PRESETS)}'
                             ' Run python -m resnet_jax.models for the list.')
    try:
        model = get_model(name, **model_overrides(config))
    except ValueError as e:
        refuse('model', str(e))
    if model.spatial_dims != 2:
        refuse('model.name', f'{name!r} is a video network (NTHWC clips) and the data pipelines '
                             'feed images; use it from Python (resnet_jax.models.get_model) with video input')
    return model
