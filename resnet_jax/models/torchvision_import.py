"""Convert torchvision ResNet / ResNeXt / Wide ResNet weights into Flax variables.

The Flax module names mirror torchvision's (`conv{i}`/`norm{i}` = `conv{i}`/`bn{i}`,
`stage{s}_block{b}` = `layer{s}.{b}`), so the conversion is a renaming plus a transpose of
the kernels to HWIO. Every expected key must be present with the expected shape and no key
may be left over: a mismatch names the first offending key.

Besides torchvision's ImageNet layout, He et al.'s CIFAR nets (option A shortcuts, and their
plain twins) load from state_dicts in the same naming, such as `torch_reference` builds;
torchvision itself has no CIFAR ResNets. Video nets (`r3d_18`, `r3d_34`) load from torchvision's
video layout, where each conv and its BN sit in a Sequential (`stem.0`/`stem.1`,
`layer{s}.{b}.conv{i}.0`/`.1`), with kernels transposed to DHWIO.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.models.resnet import ResNet

# Torch keys that carry no state our model needs.
IGNORED_KEYS = re.compile(r'.*num_batches_tracked$')
# The design values under which torchvision-named weights compute what they computed there.
TORCHVISION_DESIGN = dict(placement=('post',), norm=('batch',), se_ratio=(0.0,), stride_in_1x1=(False,),
                          activation=('relu',), branch_init=('standard', 'zero_gamma'))
# Per stem, the skip paths those weights were trained with: torchvision's ImageNet nets project a
# reshaping shortcut (B); He et al.'s CIFAR nets zero-pad it (A, no parameters) or, plain, have none.
STEM_SKIPS = {'imagenet': dict(shortcut=('B',), skip=('identity',)),
              'cifar': dict(shortcut=('A',), skip=('identity', 'none')),
              'r3d': dict(shortcut=('B',), skip=('identity',))}
# torchvision's video ResNets wrap each conv and its BN in a Sequential: stem.{0,1}, conv{i}.{0,1}.
VIDEO_NAMES = {'stem_conv': 'stem.0', 'stem_norm': 'stem.1'}


def _torch_key(path: tuple[str, ...], video: bool = False) -> tuple[str, str]:
    """(torch key, kind) for a Flax variable path such as ('params', 'stage1_block0', 'conv1', 'kernel')."""
    collection, *modules, leaf = path
    names = []
    for module in modules:
        if m := re.fullmatch(r'stage(\d+)_block(\d+)', module):
            names.append(f'layer{m[1]}.{m[2]}')
        elif video and (m := re.fullmatch(r'(conv|norm)(\d+)', module)):
            names.append(f'conv{m[2]}.{0 if m[1] == "conv" else 1}')
        elif video and module in VIDEO_NAMES:
            names.append(VIDEO_NAMES[module])
        else:
            names.append({'stem_conv': 'conv1', 'stem_norm': 'bn1', 'head': 'fc', 'shortcut_conv': 'downsample.0',
                          'shortcut_norm': 'downsample.1'}.get(module, re.sub(r'^norm', 'bn', module)))
    torch_leaf = {('params', 'kernel'): 'weight', ('params', 'scale'): 'weight', ('params', 'bias'): 'bias',
                  ('batch_stats', 'mean'): 'running_mean', ('batch_stats', 'var'): 'running_var'}[(collection, leaf)]
    kind = 'dense' if modules[-1] == 'head' and leaf == 'kernel' else 'conv' if leaf == 'kernel' else 'vector'
    return '.'.join(names + [torch_leaf]), kind


def _to_flax(value: np.ndarray, kind: str) -> np.ndarray:
    if kind == 'conv':
        return value.transpose(*range(2, value.ndim), 1, 0)  # OIHW -> HWIO, OIDHW -> DHWIO
    if kind == 'dense':
        return value.T
    return value


def _torch_shape(flax_shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
    """The shape torch stores for a variable of `flax_shape` (the inverse of `_to_flax`)."""
    if kind == 'conv':
        return tuple(flax_shape[-1:-3:-1]) + tuple(flax_shape[:-2])
    return tuple(reversed(flax_shape)) if kind == 'dense' else tuple(flax_shape)


def _as_numpy(value) -> np.ndarray:
    if hasattr(value, 'detach'):  # a torch tensor; torch itself is never imported here
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def from_torchvision(state_dict: Mapping[str, object], model: ResNet) -> dict:
    """Flax variables {'params', 'batch_stats'} for `model` from a torchvision-named `state_dict`."""
    allowed = dict(TORCHVISION_DESIGN, **STEM_SKIPS.get(model.stem, {}))
    mismatched = {k: getattr(model.design, k) for k, values in allowed.items()
                  if getattr(model.design, k) not in values}
    if model.stem not in STEM_SKIPS or (model.spatial_dims == 3) != (model.stem == 'r3d'):
        mismatched['stem'] = model.stem
    if mismatched:
        raise ValueError(f'torchvision-named weights fit only the layouts they were trained in (per stem, '
                         f'shortcut and skip among {STEM_SKIPS}; design fields among {TORCHVISION_DESIGN}); '
                         f'this model has {mismatched}')
    x = jnp.zeros((1,) + (64,) * model.spatial_dims + (3,))
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    state_dict = {k: v for k, v in state_dict.items() if not IGNORED_KEYS.match(k)}
    used = set()

    def convert(path, target):
        names = tuple(getattr(p, 'key', p) for p in path)
        key, kind = _torch_key(names, video=model.spatial_dims == 3)
        if key not in state_dict:
            raise ValueError(f'state_dict has no key {key!r} (needed for {"/".join(names)}, shape '
                             f'{tuple(target.shape)}); is it a checkpoint of this architecture?')
        value = _as_numpy(state_dict[key])
        expected = _torch_shape(target.shape, kind)
        if value.shape != expected:
            raise ValueError(f'shape mismatch at {key!r}: state_dict has {value.shape}, the model needs '
                             f'{expected} (stored as {tuple(target.shape)} at {"/".join(names)})')
        used.add(key)
        return jnp.asarray(_to_flax(value, kind), dtype=target.dtype)

    variables = jax.tree_util.tree_map_with_path(convert, dict(shapes))
    unused = sorted(set(state_dict) - used)
    if unused:
        raise ValueError(f'state_dict key {unused[0]!r} (shape {tuple(_as_numpy(state_dict[unused[0]]).shape)}) '
                         f'has no place in this model ({len(unused)} unused keys in all)')
    return variables


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a torchvision checkpoint safely: safetensors, or torch.load with weights_only=True."""
    path = os.fspath(path)
    if path.endswith('.safetensors'):
        from safetensors.numpy import load_file
        return load_file(path)
    import torch  # only needed for .pth files
    return {k: v.numpy() for k, v in torch.load(path, map_location='cpu', weights_only=True).items()}
