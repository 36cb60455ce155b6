"""Xie et al. 2017, Aggregated Residual Transformations (ResNeXt): ResNeXt-29 8x64d and 16x64d on
CIFAR-10 and CIFAR-100.

    python -m resnet_jax.train --config=experiments/resnext.py:resnext29_8x64d --workdir=runs/resnext29_8x64d
    python -m resnet_jax.sweep --config=experiments/resnext.py --sweep_dir=runs/resnext --launcher=local
    python -m resnet_jax.sweep.results runs/resnext

Recipe (the paper's CIFAR section): a 64-wide 3x3 stem and three stages of 3 bottlenecks with
cardinality C and 64-d groups; SGD momentum 0.9, weight decay 5e-4, batch 128, lr 0.1 divided
by 10 at epochs 150 and 225, 300 epochs; pad-4 crop and flip; and from the authors' code
(fb.resnet.torch): Nesterov momentum, per-channel mean/std normalisation before zero padding
(the padding is the mean colour), BatchNorm over each of the 8 GPUs' 16 examples. CIFAR-10 is the JPEG folder
(/tmp/cifar10), CIFAR-100 TFDS 'cifar100' (ArrayRecord). The sweep: both nets x {CIFAR-10,
CIFAR-100}, over ',seeds=N' seeds (the paper reports the mean of 10).

Deviations that remain: the JPEG copy of CIFAR-10; one device replaces 8 GPUs (the BN groups
reproduce their statistics, running statistics average them); seeds (the paper: mean of 10).

Expected test error % (docs/reference_numbers.md, CIFAR-10 / CIFAR-100): ResNeXt-29 8x64d (34.4M)
3.65 / 17.77; 16x64d (68.1M) 3.58 / 17.31.
Hardware: the paper used 8 GPUs; one H100 holds batch 128 of either net. Time (projected, not
measured: 6 x MACs x 15M images at about 100 TFLOP/s in float32): 8x64d (5.4 GMACs) about 1.5 h,
16x64d (10.7 GMACs) about 3 h on one H100; --config.model.dtype=bfloat16 roughly halves it.
"""

import os

from resnet_jax.sweep import options, product, seeds
from resnet_jax.train.config import from_file

CIFAR10 = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'cifar10.py')


def get_config(arg: str = 'resnext29_8x64d'):
    model, opts = options(arg, 'resnext29_8x64d', dataset='cifar10')
    c = from_file(f"{CIFAR10}:{model},dataset={opts['dataset']}")
    c.num_steps = None
    c.num_epochs = 300.0
    c.optim.weight_decay = 5e-4
    c.optim.boundaries = ()
    c.optim.boundary_epochs = (150.0, 225.0)
    c.optim.nesterov = True              # the authors' code (fb.resnet.torch)
    c.data.normalize = 'per_channel'     # fb.resnet.torch: per-channel mean/std ...
    c.data.pad_after_normalize = True    # ... then zero padding: the padding is the mean colour
    c.data.validation_split = 0          # all 50k training images
    c.model.bn_group_size = 16           # 8 GPUs x 16 of the batch of 128, not synchronised
    return c


def get_sweep(arg: str = ''):
    _, opts = options(arg, '', seeds=1)
    runs = [{'arg': f'resnext29_{c}x64d,dataset={data}'} for c in (8, 16) for data in ('cifar10', 'cifar100')]
    return product(runs, seeds(opts['seeds']))
