"""Flax ResNets: the generic module, its design space, named presets and weight import."""

from resnet_jax.models.design import BlockDesign
from resnet_jax.models.registry import (
    PRESETS,
    get_model,
    list_models,
    native_resolution,
)
from resnet_jax.models.resnet import ResidualBlock, ResNet, param_count, residual_stream

__all__ = [
    'BlockDesign', 'PRESETS', 'ResNet', 'ResidualBlock', 'from_timm', 'from_torchvision', 'get_model',
    'list_models', 'load_state_dict', 'native_resolution', 'param_count', 'residual_stream', 'timm_model',
    'to_timm', 'to_torchvision',
]
from resnet_jax.models.timm_import import from_timm, timm_model, to_timm
from resnet_jax.models.torchvision_import import (
    from_torchvision,
    load_state_dict,
    to_torchvision,
)
