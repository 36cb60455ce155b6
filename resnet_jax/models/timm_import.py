"""timm's ResNet family in and out: weights named as `timm.models.resnet` names them.

timm's keys agree with torchvision's where both have the layer; beyond them it has the deep stem
of ResNet-C/-D/-S (`conv1.0`, `conv1.1`, `conv1.3`, `conv1.4`, `conv1.6`, then `bn1`), average-pool
shortcuts (`downsample.1`/`.2` behind the parameter-free pool at `.0`) and SE modules
(`se.fc1`/`se.fc2`, biased 1x1 convs). `TIMM_MODELS` says which preset and overrides rebuild each
timm architecture; the renaming itself is shared with torchvision's (`torchvision_import`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import numpy as np

from resnet_jax.errors import close_matches
from resnet_jax.models.registry import PRESETS, get_model
from resnet_jax.models.resnet import ResNet
from resnet_jax.models.torchvision_import import (
    check_layout,
    convert_state_dict,
    save_state_dict,
    to_state_dict,
)

# The design values under which timm-named weights compute what they computed in timm.
TIMM_DESIGN = dict(placement=('post',), norm=('batch',), stride_in_1x1=(False,), activation=('relu',),
                   branch_init=('standard', 'zero_gamma'), dilated_pool=('timm',))
# timm's stems ('' and 'deep'), each with projection (B) or average-pool (D, avg_down) shortcuts.
TIMM_STEMS = {stem: dict(shortcut=('B', 'D'), skip=('identity',)) for stem in ('imagenet', 'deep')}

SE = dict(se_ratio=1 / 16, se_divisor=8)
# timm model name -> (preset, overrides) that build the same network. The "ResNet strikes back"
# weights and other pretrained tags (resnet50.a1_in1k) share their architecture's row.
TIMM_MODELS: dict[str, tuple[str, dict]] = {
    **{f'resnet{d}': (f'resnet{d}', {}) for d in (18, 26, 34, 50, 101, 152, 200)},
    **{f'resnet{d}d': (f'resnet{d}_d', {}) for d in (18, 26, 34, 50, 101, 152, 200)},
    'resnet50c': ('resnet50_c', {}),
    **{f'resnet{d}c': (f'resnet{d}', dict(stem='deep')) for d in (101, 152)},
    **{f'resnet{d}s': (f'resnet{d}', dict(stem='deep', stem_width=128)) for d in (50, 101, 152)},
    'wide_resnet50_2': ('wide_resnet50_2', {}),
    'wide_resnet101_2': ('wide_resnet101_2', {}),
    'resnext50_32x4d': ('resnext50_32x4d', {}),
    'resnext50d_32x4d': ('resnet50_d', dict(cardinality=32, base_width=4)),
    **{f'resnext101_32x{w}d': ('resnext101_32x8d', dict(base_width=w)) for w in (4, 8, 16, 32)},
    'resnext101_64x4d': ('resnext101_64x4d', {}),
    **{f'seresnet{d}': (f'se_resnet{d}', {}) for d in (18, 34, 50, 101, 152)},
    'seresnet152d': ('resnet152_d', SE),
    'seresnet200d': ('resnet200_d', SE),
    'seresnet269d': ('resnet200_d', dict(SE, stage_sizes=(3, 30, 48, 8))),
    'seresnext26d_32x4d': ('resnet26_d', dict(SE, cardinality=32, base_width=4)),
    'seresnext50_32x4d': ('se_resnext50_32x4d', {}),
    'seresnext101_32x4d': ('se_resnext101_32x8d', dict(base_width=4)),
    'seresnext101_32x8d': ('se_resnext101_32x8d', {}),
    'seresnext101d_32x8d': ('se_resnext101_32x8d', dict(stem='deep', shortcut='D')),
    'seresnext101_64x4d': ('se_resnext101_32x8d', dict(cardinality=64, base_width=4)),
}


def timm_model(name: str, num_classes: int | None = None, **overrides) -> ResNet:
    """The ResNet that timm model `name` is (a TIMM_MODELS key, optionally with a pretrained tag
    such as '.a1_in1k'), or a preset of ours, with any field overridden."""
    arch = name.partition('.')[0]
    if arch in TIMM_MODELS:
        preset, fields = TIMM_MODELS[arch]
        return get_model(preset, num_classes, **dict(fields, **overrides))
    if name in PRESETS:
        return get_model(name, num_classes, **overrides)
    raise ValueError(f'{name!r} is neither a timm ResNet we can build nor one of our presets.'
                     f'{close_matches(arch, TIMM_MODELS)} timm models: {", ".join(TIMM_MODELS)} (a pretrained '
                     "tag after '.' is allowed: resnet50.a1_in1k). Tiered stems (resnet50t) and "
                     'anti-aliased or blur-pooled variants have no preset here')


def check_timm(model: ResNet) -> None:
    """Refuse a model that timm-named weights do not describe."""
    check_layout(model, 'timm', TIMM_DESIGN, TIMM_STEMS)


def from_timm(state_dict: Mapping[str, object], model: ResNet | str, **overrides) -> dict:
    """Flax variables {'params', 'batch_stats'} from a timm-named `state_dict`, for `model`: a ResNet,
    or a timm model name or preset name (then built with `overrides`, and with as many classes as the
    state_dict's classifier unless `num_classes` is among them)."""
    if isinstance(model, str):
        if 'fc.weight' in state_dict and 'num_classes' not in overrides:
            overrides['num_classes'] = np.shape(state_dict['fc.weight'])[0]
        model = timm_model(model, **overrides)
    elif overrides:
        raise ValueError(f'overrides {sorted(overrides)} apply to a model name, not to a built ResNet; '
                         'pass the name, or build the model with them (model.clone(...))')
    check_timm(model)
    return convert_state_dict(state_dict, model)


def to_timm(variables: Mapping, model: ResNet, path: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """`model`'s variables as a timm state_dict (numpy arrays), also written to `path` as safetensors
    when given; `timm.create_model(<its timm name>, num_classes=...).load_state_dict` takes it."""
    check_timm(model)
    state_dict = to_state_dict(variables, model)
    if path is not None:
        save_state_dict(state_dict, path)
    return state_dict


def _architecture(model: ResNet) -> tuple:
    """What decides a model's weights and what they compute in eval mode, bar the class count and
    output stride (init, dropout rates and compute dtype only matter in training)."""
    design = dataclasses.replace(model.design, branch_init='standard', drop_path_rate=0.0, dropout_rate=0.0,
                                 dtype='float32')
    return (design, tuple(model.stage_sizes), tuple(model.widths), model.stem, model.stem_width,
            model.width_multiplier, model.spatial_dims)


def timm_name(model: ResNet) -> str | None:
    """The timm model that has `model`'s architecture (any class count and output stride), if any."""
    return next((name for name in TIMM_MODELS if _architecture(timm_model(name)) == _architecture(model)), None)


def timm_table() -> str:
    """TIMM_MODELS as the Markdown table in docs/transfer.md."""
    rows = ['| timm model | preset | overrides |', '|---|---|---|']
    for name, (preset, fields) in TIMM_MODELS.items():
        text = ', '.join(f'{k}={round(v, 4) if isinstance(v, float) else v}' for k, v in fields.items())
        rows.append(f'| `{name}` | `{preset}` | {f"`{text}`" if text else ""} |')
    return '\n'.join(rows)
