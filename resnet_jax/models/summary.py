"""Parameter and multiply-accumulate counts of the presets, as the table in docs/models.md.

    python -m resnet_jax.models            # Markdown table of every preset, by family
    python -m resnet_jax.models resnet50   # only the named presets

MACs are counted the way torchvision reports GMACs: every conv and linear layer, one
multiply-add per weight per output position, for one image at the preset's native
resolution (video nets: one clip of VIDEO_FRAMES frames). Shapes come from `jax.eval_shape`,
so nothing is computed or allocated.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_jax.errors import UserError, close_matches
from resnet_jax.models.registry import PRESETS, get_model, native_resolution
from resnet_jax.models.resnet import ResNet, param_count

# torchvision's video GMACs are for 16-frame clips (r3d_18: 40.697 at 16x112x112).
VIDEO_FRAMES = 16


def input_shape(model: ResNet, resolution: int, frames: int = VIDEO_FRAMES) -> tuple[int, ...]:
    """One image (1, H, W, 3), or one clip (1, T, H, W, 3) for a video net."""
    return (1,) + ((frames,) if model.spatial_dims == 3 else ()) + (resolution, resolution, 3)


def counts(model: ResNet, resolution: int, frames: int = VIDEO_FRAMES) -> tuple[int, int]:
    """(parameters, multiply-accumulates of convs and dense layers) for one `resolution`-square image (or
    clip), from one shape-only trace of `model.init`: its forward pass visits every layer as `apply` does,
    so the parameters and the MACs need no second trace."""
    macs = 0

    def count(next_fun, args, kwargs, context):
        nonlocal macs
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name == '__call__' and isinstance(module, (nn.Conv, nn.Dense)):
            fan_in = args[0].shape[-1]
            if isinstance(module, nn.Conv):
                fan_in = math.prod(module.kernel_size) * fan_in // module.feature_group_count
            macs += math.prod(out.shape) * fan_in
        return out

    x = jax.ShapeDtypeStruct(input_shape(model, resolution, frames), jnp.float32)
    with nn.intercept_methods(count):
        variables = jax.eval_shape(model.init, jax.random.key(0), x)
    return param_count(variables['params']), macs


def count_macs(model: ResNet, resolution: int, frames: int = VIDEO_FRAMES) -> int:
    """Multiply-accumulates of convs and dense layers for one `resolution`-square image (or clip)."""
    return counts(model, resolution, frames)[1]


def table(names: list[str]) -> str:
    """The Markdown table of parameters, GMACs and input size of the presets `names`."""
    rows = ['| model | parameters | GMACs | input |', '|---|---:|---:|---:|']
    for name in names:
        model = get_model(name)
        resolution = native_resolution(model)
        params, macs = counts(model, resolution)
        shape = input_shape(model, resolution)
        rows.append(f'| {name} | {params:,} | {macs / 1e9:.3f} | {"x".join(map(str, shape[1:-1]))} |')
    return '\n'.join(rows)


def main(argv: list[str]) -> None:
    """argv: absl's (the program, then the preset names; none: every preset)."""
    for name in argv[1:]:
        if name not in PRESETS:
            raise UserError(f'unknown model {name!r}.{close_matches(name, PRESETS)} Run python -m '
                            'resnet_jax.models for the list.')
    print(table(argv[1:] or list(PRESETS)))
