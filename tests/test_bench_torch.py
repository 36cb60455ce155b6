"""The PyTorch side of `bench --vs-torch` trains the same function as our JAX model.

The CIFAR nets of `torch_reference` (option A zero-padding, plain twins) convert through
`from_torchvision` and give our logits in eval mode and our loss in training mode, so a timing
comparison is between two implementations of one network. `measure`'s first loss must equal
the loss of our train step on the same weights and batch, which also pins its normalisation.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import re
import shutil

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from resnet_jax.pytorch.bench import (
    REFERENCE,
    TORCHVISION,
    make_model,
    measure,
    model_source,
)
from resnet_jax.data.augment import normalize
from resnet_jax.models.registry import get_model
from resnet_jax.models.torchvision_import import from_torchvision
from resnet_jax.pytorch.reference import (
    CIFAR_CONFIGS,
    ZeroPadShortcut,
    randomize_,
    reference_resnet,
)
from resnet_jax.train.step import cross_entropy

# As in test_torch_equivalence: errors are measured against the largest logit. Measured: ~3e-7 in
# eval mode; in training mode ~7e-7 for resnet20 but ~5e-6 (at most 7e-6 over 24 draws) for plain20,
# presumably because batch-statistics BN without skips amplifies float32 rounding with depth (Flax's
# one-pass variance is not the cause: the two-pass one gives the same).
RTOL = 1e-5
KEYS = {'images_per_sec', 'step_ms_median', 'step_ms_p10', 'step_ms_p90', 'compile_seconds',
        'peak_memory_gb', 'first_loss', 'source'}


def _batch() -> tuple[np.ndarray, np.ndarray, tuple, tuple]:
    """8 uint8 NHWC images, labels, and per-channel mean/std in [0, 1] units, as the benchmark gets them."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    return images, rng.integers(0, 10, 8).astype(np.int32), (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def _randomized(name: str) -> torch.nn.Module:
    return randomize_(reference_resnet(name), seed=len(name)).float()


@functools.cache
def _our_apply(name: str, train: bool):
    """Jitted (variables, NHWC x) -> logits of our `name`, with batch statistics when training."""
    model = get_model(name)
    if train:
        return jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'])[0])
    return jax.jit(lambda v, x: model.apply(v, x, train=False))


def _our_logits(name: str, module: torch.nn.Module, x: np.ndarray, train: bool) -> np.ndarray:
    variables = from_torchvision(module.state_dict(), get_model(name))
    return np.asarray(_our_apply(name, train)(variables, x.transpose(0, 2, 3, 1)))


def _torch_logits(module: torch.nn.Module, x: np.ndarray, train: bool) -> np.ndarray:
    with torch.no_grad():
        return module.train(train)(torch.from_numpy(x)).numpy()


def _assert_close(ours: np.ndarray, ref: np.ndarray) -> float:
    """The max error relative to max |logit|, after checking it is below RTOL."""
    assert np.abs(ref).max() > 1e-1, 'degenerate reference logits make the comparison vacuous'
    np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=RTOL * np.abs(ref).max())
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize('name, size', [('resnet20', 32), ('resnet20', 33), ('plain20', 32)])
def test_cifar_eval_logits_match_torch(name, size):
    # 33 makes every map odd (33, 17, 9): the x[::2] shortcut must match the strided conv's size.
    x = np.random.default_rng(size).standard_normal((2, 3, size, size), dtype=np.float32)
    module = _randomized(name)
    ref = _torch_logits(module, x, train=False)
    err = _assert_close(_our_logits(name, module, x, train=False), ref)
    print(f'{name} {size}x{size} eval: max relative error {err:.2e}')


@pytest.mark.parametrize('name', ['resnet20', 'plain20'])
def test_cifar_training_mode_logits_and_loss_match_torch(name):
    images, labels, mean, std = _batch()
    x = np.array(normalize(images, mean, std)).transpose(0, 3, 1, 2)  # a writable copy for torch
    module = _randomized(name)
    ours = _our_logits(name, module, x, train=True)  # converted before torch's forward updates BN stats
    ref = _torch_logits(module, x, train=True)
    err = _assert_close(ours, ref)
    our_loss = float(cross_entropy(ours, labels, 10).mean())
    ref_loss = F.cross_entropy(torch.from_numpy(ref), torch.from_numpy(labels).long()).item()
    assert our_loss == pytest.approx(ref_loss, rel=RTOL)
    print(f'{name} train: logits {err:.2e}, loss {ref_loss:.6f} vs {our_loss:.6f}')


def test_cifar_references_have_the_papers_depths():
    for name, (n, residual) in CIFAR_CONFIGS.items():
        module = reference_resnet(name)
        convs = sum(isinstance(m, torch.nn.Conv2d) for m in module.modules())
        assert convs + 1 == int(re.search(r'\d+', name)[0]) == 6 * n + 2, name  # + 1: the fc layer
        # Option A shortcuts sit where the width or the resolution changes: stages 2 and 3.
        pads = sum(isinstance(m, ZeroPadShortcut) for m in module.modules())
        assert pads == (2 if residual else 0), name
        assert module.fc.out_features == 10


def test_cifar_projection_shortcut_is_refused():
    state = reference_resnet('resnet20').state_dict()
    with pytest.raises(ValueError, match=r"this model has \{'shortcut': 'B'\}") as info:
        from_torchvision(state, get_model('resnet20', shortcut='B'))
    assert "'cifar': {'shortcut': ('A',), 'skip': ('identity', 'none')}" in str(info.value)


def test_make_model_is_seeded_and_says_where_it_came_from():
    a, b, c = (make_model('resnet20', 10, seed) for seed in (0, 0, 1))
    assert a.training and all(p.dtype == torch.float32 for p in a.parameters())
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a.conv1.weight, c.conv1.weight)
    assert model_source('resnet20') == REFERENCE  # torchvision has no CIFAR nets
    has_torchvision = importlib.util.find_spec('torchvision') is not None
    assert model_source('resnet18') == (TORCHVISION if has_torchvision else REFERENCE)
    with pytest.raises(ValueError, match="no PyTorch model 'resnet50_d'.*resnet20"):
        make_model('resnet50_d', 1000, 0)


def _measure(model: torch.nn.Module, dtype: str = 'float32', compile: bool = False) -> dict:
    images, labels, mean, std = _batch()
    return measure(model, images, labels, mean, std, dtype=dtype, compile=compile, steps=3, warmup=1,
                   device='cpu')


@functools.cache
def _eager_result() -> tuple[torch.nn.Module, dict]:
    model = make_model('resnet20', 10, seed=0)
    return model, _measure(model)


@pytest.mark.slow
def test_measure_reports_sane_numbers_and_leaves_the_model_alone():
    model, result = _eager_result()
    assert set(result) == KEYS
    fresh = make_model('resnet20', 10, seed=0).state_dict()
    assert all(torch.equal(v, fresh[k]) for k, v in model.state_dict().items())  # it trained a copy
    assert result['source'] == REFERENCE and result['peak_memory_gb'] is None
    assert 0 < result['step_ms_p10'] <= result['step_ms_median'] <= result['step_ms_p90'] < 10_000
    assert result['images_per_sec'] == pytest.approx(8 / (result['step_ms_median'] / 1e3))
    assert result['compile_seconds'] > 0


def test_measure_first_loss_is_our_train_steps_loss():
    model, result = _eager_result()
    images, labels, mean, std = _batch()
    x = np.asarray(normalize(images, mean, std))
    logits = _our_apply('resnet20', True)(from_torchvision(model.state_dict(), get_model('resnet20')), x)
    ours = float(cross_entropy(logits, labels, 10).mean())
    assert abs(ours - math.log(10)) > 0.1, 'a loss at chance level would hide wrong inputs'
    assert result['first_loss'] == pytest.approx(ours, rel=RTOL)
    print(f"first loss: torch {result['first_loss']:.6f}, ours {ours:.6f}")


def test_measure_bfloat16_autocast_changes_the_loss_only_by_rounding():
    model, float32 = _eager_result()
    bf16 = _measure(model, dtype='bfloat16')
    # Identical losses would mean autocast did nothing; bfloat16 keeps ~3 significant digits.
    assert 0 < abs(bf16['first_loss'] - float32['first_loss']) < 0.02 * float32['first_loss']


@pytest.mark.slow
@pytest.mark.skipif(shutil.which('g++') is None, reason="torch.compile's CPU backend needs a C++ compiler")
def test_measure_compiled_matches_eager():
    model, eager = _eager_result()
    compiled = _measure(model, compile=True)
    assert set(compiled) == KEYS
    # Inductor fuses and reorders float32 ops: equal up to rounding, from the same weights.
    assert compiled['first_loss'] == pytest.approx(eager['first_loss'], rel=1e-5)
    assert compiled['compile_seconds'] > compiled['step_ms_median'] / 1e3
