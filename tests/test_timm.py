"""timm weights in, PyTorch weights out.

The oracle is `torch_reference.reference_timm`, a torch.nn rebuild of timm's ResNets in timm's key
layout: timm itself imports torchvision, whose wheel for this torch cannot load here. (Checked once
by hand against timm 1.0.31's own model code, imported with torchvision stubbed out: the same keys
in the same order, and bit-identical logits for every net below.) Random weights and BatchNorm
statistics; eval mode; 65x65 keeps every feature map odd, so pooling and padding rules count.
"""

from __future__ import annotations

import functools
import json

import flax
import jax
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_train import run_module

from resnet_jax import export
from resnet_jax.errors import UserError
from resnet_jax.models import (
    from_timm,
    from_torchvision,
    get_model,
    timm_model,
    to_timm,
    to_torchvision,
)
from resnet_jax.models.timm_import import TIMM_MODELS, timm_name, timm_table
from resnet_jax.pytorch.reference import randomize_, reference_resnet, reference_timm

RTOL = 1e-5  # relative to the largest logit: float32 noise is ~1e-6 here (see test_torch_equivalence)
X = np.random.default_rng(0).standard_normal((2, 3, 65, 65), dtype=np.float32)


@functools.cache
def _apply(model):
    """One compiled forward per architecture, shared by the tests."""
    return jax.jit(model.apply)


def _logits(model, variables) -> np.ndarray:
    return np.asarray(_apply(model)(variables, X.transpose(0, 2, 3, 1)))


def _torch_logits(module: torch.nn.Module, dtype=torch.float32) -> np.ndarray:
    with torch.no_grad():
        return module.to(dtype)(torch.from_numpy(X).to(dtype)).numpy()


def _assert_close(ours, ref):
    assert np.abs(ours - ref).max() <= RTOL * np.abs(ref).max(), np.abs(ours - ref).max() / np.abs(ref).max()


@functools.cache
def _reference(name: str, output_stride: int = 32) -> torch.nn.Module:
    return randomize_(reference_timm(name, output_stride=output_stride), seed=len(name)).eval()


@pytest.mark.parametrize('name, output_stride', [
    ('resnet50d', 32), ('resnet26d', 32), ('seresnet18', 32), ('seresnext50_32x4d', 32),
    ('resnet50', 8), ('resnet50d', 16)])
@pytest.mark.slow
def test_timm_weights_give_timms_logits(name, output_stride):
    reference = _reference(name, output_stride)
    variables = from_timm(reference.state_dict(), name, output_stride=output_stride)
    model = timm_model(name, output_stride=output_stride)
    _assert_close(_logits(model, variables), _torch_logits(reference))
    if output_stride == 16:  # the a-trous pool rule is a different function: the rule is what matched
        a_trous = _logits(timm_model(name, output_stride=16, dilated_pool='a_trous'), variables)
        assert np.abs(a_trous - _torch_logits(reference)).max() > 1e-3 * np.abs(a_trous).max()


def _random_variables(model, seed: int) -> dict:
    """He-scaled kernels, and random values for every per-channel vector (BN scale, bias,
    statistics; SE biases), so that a swapped or dropped vector changes the logits."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 65, 65, 3), np.float32))
    rng = np.random.default_rng(seed)

    def randomize(path, value):
        leaf = path[-1].key
        if leaf == 'kernel':  # HWIO or (in, out): fan-in is all but the last axis; the head gets 1 / fan-in
            gain = 1 if path[-2].key == 'head' else 2
            return rng.normal(0, (gain / np.prod(value.shape[:-1])) ** 0.5, value.shape).astype(np.float32)
        if leaf in ('scale', 'var'):  # as torch_reference.randomize_ draws them
            return rng.uniform(0.5, 1.5 if leaf == 'scale' else 2.0, value.shape).astype(np.float32)
        return rng.normal(0, 0.2, value.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(randomize, dict(shapes))


@pytest.mark.parametrize('name, library', [('resnet50', 'torchvision'), ('resnet50d', 'timm'),
                                           ('seresnet50', 'timm')])
@pytest.mark.slow
def test_export_round_trip(name, library, tmp_path):
    """Ours -> a state_dict in safetensors -> the torch net (strict load) -> the same logits; and
    that state_dict -> ours again -> the very same variables. Torch runs in float64 here, so the
    tolerance holds our float32 noise alone: SE nets with random statistics amplify rounding to
    ~5e-6 of the largest logit in each float32 implementation, and two of them can add up to 1e-5;
    on a machine whose float32 convs round more, PyTorch's own float32 error there sets the bound."""
    model = timm_model(name)
    variables = _random_variables(model, seed=1)
    path = tmp_path / 'weights.safetensors'
    (to_torchvision if library == 'torchvision' else to_timm)(variables, model, path)
    state_dict = load_file(str(path))
    reference = reference_resnet(name) if library == 'torchvision' else reference_timm(name)
    reference.load_state_dict(state_dict, strict=True)
    assert all(state_dict[k].dtype == torch.int64 for k in state_dict if k.endswith('num_batches_tracked'))
    exact = _torch_logits(reference, torch.float64)
    scale = np.abs(exact).max()
    ours, theirs = (np.abs(logits - exact).max() / scale
                    for logits in (_logits(model, variables), _torch_logits(reference)))
    # Where this machine's float32 convs round more than usual (PyTorch's own float32 logits off by more
    # than half the tolerance), the bound is twice PyTorch's error: on an Intel Xeon VM, 8.3e-6 for
    # PyTorch and 1.24e-5 for XLA's convs on seresnet50, against 6.8e-6 for XLA's on an AMD EPYC.
    assert ours <= max(RTOL, 2 * theirs), (ours, theirs)
    back = (from_torchvision if library == 'torchvision' else from_timm)(state_dict, model)
    flat_back, flat_ours = (flax.traverse_util.flatten_dict(jax.device_get(v)) for v in (back, variables))
    assert flat_back.keys() == flat_ours.keys()
    for key, value in flat_ours.items():
        np.testing.assert_array_equal(flat_back[key], value, err_msg=str(key))


@pytest.mark.parametrize('importer', [from_torchvision, from_timm])
def test_importers_copy_the_source_buffers(importer):
    """torch's .numpy() shares memory; an in-place change to the source afterwards must not reach the
    (immutable) JAX variables."""
    state_dict = randomize_(reference_resnet('resnet18', num_classes=10), seed=0).state_dict()
    variables = importer(state_dict, get_model('resnet18', num_classes=10))
    before = jax.tree_util.tree_map(np.array, variables)
    for tensor in state_dict.values():
        tensor.add_(1)
    for path, value in jax.tree_util.tree_flatten_with_path(variables)[0]:
        leaf = functools.reduce(lambda tree, k: tree[k.key], path, before)
        np.testing.assert_array_equal(np.asarray(value), leaf, err_msg=jax.tree_util.keystr(path))


def test_a_mismatch_names_the_key_and_both_shapes():
    state_dict = dict(_reference('seresnet18').state_dict())
    state_dict['layer2.0.se.fc1.weight'] = torch.zeros(4, 128, 1, 1)
    with pytest.raises(ValueError, match=r"shape mismatch at 'layer2\.0\.se\.fc1\.weight': state_dict has "
                                         r'\(4, 128, 1, 1\), the model needs \(8, 128, 1, 1\)'):
        from_timm(state_dict, 'seresnet18')
    # our own rounding (se_divisor=1) gives 4 hidden channels in stage 1: timm's weights do not fit it
    with pytest.raises(ValueError, match=r"shape mismatch at 'layer1\.0\.se\.fc2\.weight': state_dict has "
                                         r'\(64, 8, 1, 1\), the model needs \(64, 4, 1, 1\)'):
        from_timm(_reference('seresnet18').state_dict(), 'seresnet18', se_divisor=1)


def test_layouts_timm_lacks_are_refused_by_name():
    state_dict = _reference('resnet26d').state_dict()
    with pytest.raises(ValueError, match=r"this model has \{'dilated_pool': 'a_trous'\}"):
        from_timm(state_dict, 'resnet26d', dilated_pool='a_trous')
    with pytest.raises(ValueError, match=r"this model has \{'stem': 'deep'\}"):
        from_torchvision(state_dict, timm_model('resnet26d'))
    with pytest.raises(ValueError, match=r"'resnet50t' is neither a timm ResNet .* Did you mean: resnet50"):
        timm_model('resnet50t')


def test_every_timm_name_builds_and_pretrained_tags_are_accepted():
    assert timm_model('resnet50.a1_in1k') == timm_model('resnet50')
    for name in TIMM_MODELS:
        assert timm_name(timm_model(name)) in TIMM_MODELS
    assert timm_name(timm_model('seresnext26d_32x4d', num_classes=7, output_stride=16)) == 'seresnext26d_32x4d'
    assert timm_name(get_model('resnet20')) is None


def test_readme_lists_the_timm_models():
    from pathlib import Path
    assert timm_table() in (Path(__file__).parents[1] / 'docs' / 'transfer.md').read_text()


# A ResNet-26-D with SE, shrunk: the deep stem, avg-pool shortcuts and SE modules all take part.
TINY_D = {'model.name': 'resnet26_d', 'model.stage_sizes': '(1,1,1,1)', 'model.widths': '(8,8,16,16)',
          'model.stem_width': 8, 'model.se_ratio': 0.25, 'model.se_divisor': 8, 'data.image_size': 16,
          'data.num_train': 64, 'data.num_eval': 32, 'batch_size': 16, 'eval.batch_size': 16, 'num_steps': 1,
          'optim.lr': 1e-30, 'optim.weight_decay': 0.0, 'optim.warmup_steps': 0, 'log.every_steps': 1,
          'eval.every_steps': 1, 'checkpoint.every_steps': 1, 'log.progress_seconds': 0}


@pytest.mark.slow
def test_init_from_timm_and_export_to_timm_from_the_command_line(tmp_path):
    """timm-named weights (written by to_timm, checked above against the torch reference) start a run
    from the command line; its checkpoint exports back to timm's names and loads strictly into torch.
    With lr 1e-30 (0 is refused) an update is far below float32 resolution, so the step changes only the BN
    statistics and every other exported tensor is the source's."""
    model = get_model('resnet26_d', num_classes=10, stage_sizes=(1, 1, 1, 1), widths=(8, 8, 16, 16),
                      stem_width=8, se_ratio=0.25, se_divisor=8)
    source = to_timm(_random_variables(model, seed=2), model, tmp_path / 'timm.safetensors')
    workdir = tmp_path / 'run'
    result = run_module(['-m', 'resnet_jax.train', '--config=experiments/quickstart.py', f'--workdir={workdir}',
                         *(f'--config.{k}={v}' for k, v in TINY_D.items()),
                         f'--config.init.source=timm:{tmp_path / "timm.safetensors"}'])
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / 'exported.safetensors'
    export.export(str(workdir), str(out), format='timm')  # the command's body: a subprocess costs a minute here
    info = json.loads((tmp_path / 'exported.safetensors.json').read_text())
    assert info['format'] == 'timm' and info['num_classes'] == 10 and info['timm_model'] is None
    exported = load_file(str(out))
    assert exported.keys() == source.keys()
    for key, value in source.items():
        if 'running_' not in key and 'num_batches' not in key:
            np.testing.assert_array_equal(exported[key].numpy(), value, err_msg=key)
    with pytest.raises(ValueError, match=r"torchvision-named weights fit only .* this model has \{'se_ratio': 0\.25, "
                                         r"'stem': 'deep'\}"):
        export.export(str(workdir), str(tmp_path / 'tv.safetensors'), format='torchvision')
    with pytest.raises(UserError, match=r'--format=timm writes safetensors; name the file <name>\.safetensors'):
        export.export(str(workdir), str(tmp_path / 'model.pth'), format='timm')
