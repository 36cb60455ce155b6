"""Convert torchvision ResNet / ResNeXt / Wide ResNet weights into Flax variables, and back.

The Flax module names mirror torchvision's (`conv{i}`/`norm{i}` = `conv{i}`/`bn{i}`,
`stage{s}_block{b}` = `layer{s}.{b}`), so the conversion is a renaming plus a transpose of
the kernels to HWIO. Every expected key must be present with the expected shape and no key
may be left over: a mismatch names the first offending key. The renaming core here also
serves timm's naming (`timm_import`), and `to_state_dict` runs it backwards for export.

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
from safetensors.numpy import load_file, save_file

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


def _torch_key(path: tuple[str, ...], model: ResNet) -> tuple[str, str]:
    """(torch key, kind) for a Flax variable path such as ('params', 'stage1_block0', 'conv1', 'kernel').

    One naming covers torchvision and timm: their keys agree wherever both have the layer, and the
    deep stem (`conv1.{0,1,3,4,6}` and `bn1`), avg-pool shortcuts (`downsample.{1,2}` behind the
    pool at `.0`) and SE modules (`se.fc1`/`se.fc2`) exist only in timm."""
    collection, *modules, leaf = path
    video, avg_down = model.spatial_dims == 3, model.design.shortcut == 'D'
    names = []
    for module in modules:
        if m := re.fullmatch(r'stage(\d+)_block(\d+)', module):
            names.append(f'layer{m[1]}.{m[2]}')
        elif video and (m := re.fullmatch(r'(conv|norm)(\d+)', module)):
            names.append(f'conv{m[2]}.{0 if m[1] == "conv" else 1}')
        elif video and module in VIDEO_NAMES:
            names.append(VIDEO_NAMES[module])
        elif m := re.fullmatch(r'stem_(conv|norm)(\d)', module):  # the deep stem's three convs
            i = int(m[2]) - 1
            names.append('bn1' if module == 'stem_norm3' else f'conv1.{3 * i + (m[1] == "norm")}')
        else:
            names.append({'stem_conv': 'conv1', 'stem_norm': 'bn1', 'head': 'fc',
                          'shortcut_conv': f'downsample.{0 + avg_down}', 'shortcut_norm': f'downsample.{1 + avg_down}',
                          'reduce': 'fc1', 'expand': 'fc2'}.get(module, re.sub(r'^norm', 'bn', module)))
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


def _to_torch(value: np.ndarray, kind: str) -> np.ndarray:
    """The inverse of `_to_flax`."""
    if kind == 'conv':
        return value.transpose(value.ndim - 1, value.ndim - 2, *range(value.ndim - 2))
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


def check_layout(model: ResNet, source: str, design: Mapping[str, tuple], stems: Mapping[str, dict]) -> None:
    """Refuse a model whose design differs from what `source`'s weights were trained in: the weights
    might fit its shapes and still compute something else. `design` maps BlockDesign fields to their
    allowed values; `stems` maps each allowed stem to its allowed shortcut and skip values."""
    allowed = dict(design, **stems.get(model.stem, {}))
    mismatched = {k: getattr(model.design, k) for k, values in allowed.items()
                  if getattr(model.design, k) not in values}
    if model.stem not in stems or (model.spatial_dims == 3) != (model.stem == 'r3d'):
        mismatched['stem'] = model.stem
    if mismatched:
        raise ValueError(f'{source}-named weights fit only the layouts they were trained in (per stem, '
                         f'shortcut and skip among {dict(stems)}; design fields among {dict(design)}); '
                         f'this model has {mismatched}')


def _template(model: ResNet) -> dict:
    """The shapes of `model`'s variables, without computing anything."""
    x = jnp.zeros((1,) + (64,) * model.spatial_dims + (3,))
    return dict(jax.eval_shape(model.init, jax.random.key(0), x))


def convert_state_dict(state_dict: Mapping[str, object], model: ResNet) -> dict:
    """Flax variables for `model` from a torch `state_dict` in torchvision's or timm's naming, copied
    (never views of the caller's buffers). Every expected key must be there with the expected shape
    and no key may be left over; the first that is not names itself."""
    state_dict = {k: v for k, v in state_dict.items() if not IGNORED_KEYS.match(k)}
    used = set()

    def convert(path, target):
        names = tuple(getattr(p, 'key', p) for p in path)
        key, kind = _torch_key(names, model)
        if key not in state_dict:
            raise ValueError(f'state_dict has no key {key!r} (needed for {"/".join(names)}, shape '
                             f'{tuple(target.shape)}); is it a checkpoint of this architecture?')
        value = _as_numpy(state_dict[key])
        expected = _torch_shape(target.shape, kind)
        if value.shape != expected:
            raise ValueError(f'shape mismatch at {key!r}: state_dict has {value.shape}, the model needs '
                             f'{expected} (stored as {tuple(target.shape)} at {"/".join(names)})')
        used.add(key)
        return jnp.asarray(np.array(_to_flax(value, kind), dtype=target.dtype, copy=True))

    variables = jax.tree_util.tree_map_with_path(convert, _template(model))
    unused = sorted(set(state_dict) - used)
    if unused:
        raise ValueError(f'state_dict key {unused[0]!r} (shape {tuple(_as_numpy(state_dict[unused[0]]).shape)}) '
                         f'has no place in this model ({len(unused)} unused keys in all)')
    return variables


def to_state_dict(variables: Mapping, model: ResNet) -> dict[str, np.ndarray]:
    """`model`'s variables {'params', 'batch_stats'} as a torch state_dict of numpy arrays (the
    inverse of `convert_state_dict`), with the `num_batches_tracked` counter (0) that torch's
    BatchNorm keeps beside its running statistics, so that `load_state_dict(strict=True)` accepts it."""
    flat = {tuple(getattr(p, 'key', p) for p in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(dict(variables))[0]}
    state_dict = {}
    for path, target in jax.tree_util.tree_flatten_with_path(_template(model))[0]:
        names = tuple(getattr(p, 'key', p) for p in path)
        if names not in flat:
            raise ValueError(f'variables have no {"/".join(names)} (shape {tuple(target.shape)}); '
                             f'are they variables of this model?')
        value = np.array(jax.device_get(flat.pop(names)), dtype=np.float32)
        if value.shape != tuple(target.shape):
            raise ValueError(f'shape mismatch at {"/".join(names)}: variables have {value.shape}, '
                             f'the model needs {tuple(target.shape)}')
        key, kind = _torch_key(names, model)
        state_dict[key] = np.ascontiguousarray(_to_torch(value, kind))
        if key.endswith('.running_mean'):
            state_dict[key.removesuffix('running_mean') + 'num_batches_tracked'] = np.zeros((), np.int64)
    if flat:
        extra = sorted(flat)[0]
        raise ValueError(f'variables hold {"/".join(map(str, extra))}, which this model does not have '
                         f'({len(flat)} extra leaves in all)')
    return state_dict


def save_state_dict(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """Write a state_dict of numpy arrays as safetensors, readable by `safetensors.torch.load_file`."""
    save_file(dict(state_dict), os.fspath(path))


def check_torchvision(model: ResNet) -> None:
    """Refuse a model that torchvision-named weights do not describe."""
    check_layout(model, 'torchvision', TORCHVISION_DESIGN, STEM_SKIPS)


def from_torchvision(state_dict: Mapping[str, object], model: ResNet) -> dict:
    """Flax variables {'params', 'batch_stats'} for `model` from a torchvision-named `state_dict`."""
    check_torchvision(model)
    return convert_state_dict(state_dict, model)


def to_torchvision(variables: Mapping, model: ResNet, path: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """`model`'s variables as a torchvision state_dict (numpy arrays), also written to `path` as
    safetensors when given; `torchvision.models.<name>().load_state_dict` takes it as it is."""
    check_torchvision(model)
    state_dict = to_state_dict(variables, model)
    if path is not None:
        save_state_dict(state_dict, path)
    return state_dict


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a torchvision checkpoint safely: safetensors, or torch.load with weights_only=True."""
    path = os.fspath(path)
    if path.endswith('.safetensors'):
        return load_file(path)
    import torch  # only needed for .pth files
    return {k: v.numpy() for k, v in torch.load(path, map_location='cpu', weights_only=True).items()}
