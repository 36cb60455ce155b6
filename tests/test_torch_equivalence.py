"""torchvision weights give the same logits in our Flax ResNet as in PyTorch.

The oracle is `torch_reference`, a torch.nn rebuild of torchvision's ResNets with its exact
parameter names, filled with random weights and BatchNorm statistics. Its `state_dict()` goes
through `from_torchvision`, and both networks run in eval mode on the same input.

65x65 keeps every feature map odd (33, 17, 9, 5, 3), so output sizes must follow torch's floor
rule; 64x64 keeps them all even, which is where XLA's 'SAME' padding (extra pad at the bottom
and right) would differ from torch's symmetric (k - 1) / 2 and shift the sampling grid.
"""

from __future__ import annotations

import functools
import re

import jax
import numpy as np
import pytest
import torch

from resnet_jax.models.registry import get_model
from resnet_jax.models.torchvision_import import from_torchvision, load_state_dict
from resnet_jax.pytorch.reference import randomize_, reference_resnet

MODELS = ('resnet18', 'resnet50', 'resnext50_32x4d', 'wide_resnet50_2')
# float32 noise after ~50 layers is about 1e-6 of the largest logit (measured 5e-7..1e-6), but a
# logit that happens to sit near zero can carry a relative error of ~1e-4 from that same noise.
# So atol is scaled by max|logit|: the check is |ours - ref| <= 1e-5 * (|ref| + max|ref|), i.e.
# ~1e-5 relative to the logit scale. One BN mean off by 10% gives ~6e-4, well outside it.
RTOL = 1e-5


def _input(size: int, seed: int = 0) -> np.ndarray:
    """A batch of 2 random NCHW images."""
    return np.random.default_rng(seed).standard_normal((2, 3, size, size), dtype=np.float32)


@functools.cache
def _reference(name: str, num_classes: int = 1000) -> torch.nn.Module:
    """Built once per worker: the reference for `name` with seeded random weights, eval mode."""
    return randomize_(reference_resnet(name, num_classes), seed=len(name)).eval().float()


def _state_dict(name: str) -> dict[str, torch.Tensor]:
    return dict(_reference(name).state_dict())


def _torch_logits(name: str, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return _reference(name)(torch.from_numpy(x)).numpy()


def _our_logits(name: str, variables, x: np.ndarray) -> np.ndarray:
    model = get_model(name)
    return np.asarray(jax.jit(model.apply)(variables, x.transpose(0, 2, 3, 1)))


def _max_rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _assert_close(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape
    assert np.abs(ref).max() > 1e-2, 'degenerate reference logits make the comparison vacuous'
    np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=RTOL * np.abs(ref).max())


@pytest.mark.parametrize('name', MODELS)
@pytest.mark.slow
def test_logits_match_torch_odd_size(name):
    x = _input(65)
    ref = _torch_logits(name, x)
    ours = _our_logits(name, from_torchvision(_state_dict(name), get_model(name)), x)
    print(f'{name}: max relative error {_max_rel_err(ours, ref):.2e} (max |logit| {np.abs(ref).max():.2f})')
    _assert_close(ours, ref)


def test_logits_match_torch_even_size():
    x = _input(64, seed=1)
    ref = _torch_logits('resnet18', x)
    ours = _our_logits('resnet18', from_torchvision(_state_dict('resnet18'), get_model('resnet18')), x)
    print(f'resnet18 64x64: max relative error {_max_rel_err(ours, ref):.2e}')
    _assert_close(ours, ref)


def test_num_batches_tracked_is_ignored():
    state = _state_dict('resnet18')
    assert any(k.endswith('num_batches_tracked') for k in state)  # a real torch state dict has them
    from_torchvision({k: v for k, v in state.items() if not k.endswith('num_batches_tracked')},
                     get_model('resnet18'))


@pytest.mark.parametrize('key', ['conv1.weight', 'layer3.1.bn2.running_var', 'layer2.0.downsample.0.weight',
                                 'fc.bias'])
def test_missing_key_is_named(key):
    state = _state_dict('resnet18')
    del state[key]
    with pytest.raises(ValueError, match=re.escape(repr(key))):
        from_torchvision(state, get_model('resnet18'))


def test_wrong_architecture_names_first_missing_key():
    # resnet34 has 3 blocks in layer1 where resnet18 has 2: its first missing key is in layer1.2.
    missing = set(reference_resnet('resnet34').state_dict()) - set(_state_dict('resnet18'))
    with pytest.raises(ValueError, match='no key') as info:
        from_torchvision(_state_dict('resnet18'), get_model('resnet34'))
    named = re.search(r"no key '([^']+)'", str(info.value))[1]
    assert named in missing and named.startswith('layer1.2.'), str(info.value)


def test_wrong_shape_names_key_and_both_shapes():
    state = _state_dict('resnet18')
    state['fc.weight'] = torch.zeros(10, 512)  # a 10-class head in a 1000-class model
    with pytest.raises(ValueError, match=re.escape("'fc.weight'")) as info:
        from_torchvision(state, get_model('resnet18'))
    message = str(info.value)
    assert 'state_dict has (10, 512), the model needs (1000, 512)' in message, message


def test_checkpoint_with_other_class_count_is_refused():
    state = dict(reference_resnet('resnet18', num_classes=10).state_dict())
    with pytest.raises(ValueError, match=r"'fc\.(weight|bias)'.*\(10,?"):
        from_torchvision(state, get_model('resnet18'))
    from_torchvision(state, get_model('resnet18', num_classes=10))  # and fits a 10-class model


def test_extra_key_is_named():
    state = _state_dict('resnet18')
    state['layer5.0.conv1.weight'] = torch.zeros(8, 8, 3, 3)
    with pytest.raises(ValueError, match=re.escape("'layer5.0.conv1.weight'")):
        from_torchvision(state, get_model('resnet18'))


@pytest.mark.parametrize('overrides', [dict(placement='preact'), dict(branch_init='skipinit'),
                                       dict(activation='gelu'), dict(stem='deep')])
def test_models_whose_layout_differs_from_torchvisions_are_refused(overrides):
    field, value = next(iter(overrides.items()))
    with pytest.raises(ValueError, match=rf"this model has {{'{field}': '{value}'}}"):
        from_torchvision(_state_dict('resnet18'), get_model('resnet18', **overrides))


def test_load_state_dict_round_trips(tmp_path):
    from safetensors.torch import save_file

    state = _state_dict('resnet18')
    torch.save(state, tmp_path / 'weights.pth')
    save_file(state, tmp_path / 'weights.safetensors')
    model = get_model('resnet18')
    x = _input(33, seed=2)
    expected = _our_logits('resnet18', from_torchvision(state, model), x)
    for path in (tmp_path / 'weights.pth', tmp_path / 'weights.safetensors'):
        loaded = load_state_dict(path)
        assert sorted(loaded) == sorted(state)
        for key, value in state.items():
            np.testing.assert_array_equal(loaded[key], value.numpy(), err_msg=f'{path.name}: {key}')
        np.testing.assert_array_equal(_our_logits('resnet18', from_torchvision(loaded, model), x), expected)
