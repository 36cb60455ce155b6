"""The PyTorch side of `bench --vs-torch`: train a torch ResNet on one batch and time the steps.

torch is imported only here, so the rest of the package runs without it. A model comes from
torchvision when it is importable and has the name, otherwise from `torch_reference` (the CIFAR
nets, which torchvision lacks, or any net when torchvision is missing); both start from torch's
default init for their class under `torch.manual_seed(seed)`.

What a step does, chosen to match our JAX train step: SGD (lr 0.1, momentum 0.9, weight decay
1e-4 added to the gradient as torch does), cross-entropy on float32 logits, BatchNorm in training
mode, channels_last tensors, bfloat16 autocast for dtype 'bfloat16'. The batch is normalised on the
device once and reused, so no host work or transfer sits in the timed loop.

Precision flags are left at torch's defaults: float32 convolutions may use TF32 on Ampere and
later GPUs (`torch.backends.cudnn.conv.fp32_precision` is 'tf32', i.e. cudnn.allow_tf32=True),
while float32 matmuls (the fc layer) do not (`torch.get_float32_matmul_precision()` is 'highest',
cuda.matmul.allow_tf32=False). On CUDA, cudnn.benchmark is turned on for the whole process.
"""

from __future__ import annotations

import copy
import functools
import gc
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from resnet_jax.pytorch.reference import CIFAR_CONFIGS, CONFIGS, reference_resnet

TORCHVISION = 'torchvision'
REFERENCE = 'torch.nn reference'
DTYPES = ('float32', 'bfloat16')


@functools.cache
def _torchvision_models() -> frozenset[str]:
    """Names of torchvision's classification models; empty when torchvision is not installed."""
    try:
        import torchvision
    except ImportError:
        return frozenset()
    return frozenset(torchvision.models.list_models(module=torchvision.models))


def model_source(name: str) -> str:
    """Where `make_model(name, ...)` takes its model from: TORCHVISION or REFERENCE."""
    if name in _torchvision_models():
        return TORCHVISION
    if name in CONFIGS or name in CIFAR_CONFIGS:
        return REFERENCE
    why = 'lacks it' if _torchvision_models() else 'is not installed'
    raise ValueError(f'no PyTorch model {name!r}: torchvision {why} and torch_reference builds only '
                     + ', '.join(sorted(CONFIGS) + sorted(CIFAR_CONFIGS)))


def make_model(name: str, num_classes: int, seed: int) -> nn.Module:
    """`name` with torch's default init under `seed`, float32, in training mode."""
    torch.manual_seed(seed)
    if model_source(name) == TORCHVISION:
        import torchvision
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    else:
        model = reference_resnet(name, num_classes)
    return model.float().train()


def _source_of(model: nn.Module) -> str:
    return TORCHVISION if type(model).__module__.startswith('torchvision.') else REFERENCE


def measure(model: nn.Module, images: np.ndarray, labels: np.ndarray, mean: Sequence[float],
            std: Sequence[float], *, dtype: str, compile: bool, steps: int, warmup: int,
            device: str, train: bool = True) -> dict:
    """Train a copy of `model` for `warmup` (>= 1) untimed then `steps` timed steps on one batch; with
    train=False, evaluate it instead (eval-mode BatchNorm, no gradients).

    images: uint8 NHWC, labels: integer class ids; mean/std: per channel, for images in [0, 1].
    The copy keeps `model` untouched, so eager and compiled runs start from the same weights.
    Returns images_per_sec (batch / median step), step_ms_median/p10/p90, compile_seconds (the
    wall time of the warm-up steps, compilation included), peak_memory_gb (GiB, None on CPU),
    first_loss (of the very first step) and source (TORCHVISION or REFERENCE).
    """
    if dtype not in DTYPES:
        raise ValueError(f'dtype={dtype!r} is not supported; choose one of: {", ".join(DTYPES)}')
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != len(mean):
        raise ValueError(f'images must be uint8 NHWC with {len(mean)} channels, got {images.dtype} {images.shape}')
    if steps < 1 or warmup < 1:  # the first step compiles and warms caches: it is never timed
        raise ValueError(f'need steps >= 1 and warmup >= 1, got steps={steps}, warmup={warmup}')
    dev = torch.device(device)
    cuda = dev.type == 'cuda'
    # Drop compiled graphs of earlier runs: compilation is timed afresh and their memory is freed.
    torch.compiler.reset()
    gc.collect()
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)

    net = copy.deepcopy(model).to(dev, memory_format=torch.channels_last).train(train)

    def per_channel(values: Sequence[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=dev).view(1, -1, 1, 1)

    x = torch.from_numpy(images).to(dev).permute(0, 3, 1, 2).float()  # NCHW view of NHWC memory
    x = ((x / 255.0 - per_channel(mean)) / per_channel(std)).contiguous(memory_format=torch.channels_last)
    y = torch.from_numpy(np.asarray(labels)).to(dev, torch.long)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    forward = torch.compile(net) if compile else net

    def train_step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == 'bfloat16'):
            logits = forward(x)
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        optimizer.step()
        return loss.detach()

    @torch.inference_mode()
    def eval_step() -> torch.Tensor:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == 'bfloat16'):
            logits = forward(x)
        return F.cross_entropy(logits.float(), y)

    step = train_step if train else eval_step

    start = time.perf_counter()
    first_loss = step()
    for _ in range(warmup - 1):
        step()
    if cuda:
        torch.cuda.synchronize(dev)
    warmup_seconds = time.perf_counter() - start

    if cuda:  # events time the GPU's work without a host sync inside the loop
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(steps)]
        for begin, end in events:
            begin.record()
            step()
            end.record()
        torch.cuda.synchronize(dev)
        step_ms = np.array([begin.elapsed_time(end) for begin, end in events])
    else:  # CPU ops run synchronously, so the host clock sees the whole step
        step_ms = np.empty(steps)
        for i in range(steps):
            start = time.perf_counter()
            step()
            step_ms[i] = (time.perf_counter() - start) * 1e3

    p10, median, p90 = np.percentile(step_ms, [10, 50, 90])
    return {
        'images_per_sec': float(len(images) / (median / 1e3)),
        'step_ms_median': float(median),
        'step_ms_p10': float(p10),
        'step_ms_p90': float(p90),
        'compile_seconds': warmup_seconds,
        'peak_memory_gb': torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else None,
        'first_loss': first_loss.item(),
        'source': _source_of(model),
    }
