"""Zagoruyko & Komodakis 2016, Wide Residual Networks: WRN-40-4, WRN-16-8 and WRN-28-10 (with and
without dropout) on CIFAR-10 and CIFAR-100.

    python -m resnet_jax.train --config=experiments/wide_resnet.py:wrn28_10 --workdir=runs/wrn28_10
    python -m resnet_jax.train --config=experiments/wide_resnet.py:wrn28_10,dataset=cifar100 \
        --workdir=runs/wrn28_10_c100 --config.model.dropout_rate=0.3
    python -m resnet_jax.sweep --config=experiments/wide_resnet.py --sweep_dir=runs/wrn --launcher=local
    python -m resnet_jax.sweep.results runs/wrn

Recipe (the paper's): pre-activation basic blocks, depth 6n+4, widths 16/16k/32k/64k; SGD with
Nesterov momentum 0.9, weight decay 5e-4, batch 128, lr 0.1 multiplied by 0.2 at epochs 60,
120 and 160, 200 epochs; pad-4 crop by reflection (the authors' script) and flip; per-channel
mean/std normalisation; one BatchNorm over the batch of 128; dropout 0.3
between the convs of each block where noted. CIFAR-10 is the JPEG folder (/tmp/cifar10),
CIFAR-100 TFDS 'cifar100' (ArrayRecord). The sweep: the four nets x {CIFAR-10, CIFAR-100},
over ',seeds=N' seeds (the paper reports the median of 5).

Deviations that remain: the JPEG copy of CIFAR-10; the paper does not say over how many GPUs
BatchNorm split the batch (one BN over 128 here); seeds.

Expected test error % (docs/reference_numbers.md, CIFAR-10 / CIFAR-100): WRN-40-4 (8.9M) 4.53 /
21.18; WRN-16-8 (11.0M) 4.27 / 20.43; WRN-28-10 (36.5M) 4.00 / 19.25; WRN-28-10 with dropout
3.89 / 18.85.
Hardware: one GPU per run; --config.model.dtype=bfloat16 roughly halves the time on
H100/A100. Time (projected, not measured: 6 x MACs x images at about 100 TFLOP/s in float32 on
one H100): WRN-28-10 (5.2 GMACs, 10M images) about 1 h, WRN-40-4 and WRN-16-8 about 15 min;
the sweep about 5 h per seed, one run after another.
"""

import os

from resnet_jax.sweep import options, product, seeds
from resnet_jax.train.config import from_file

CIFAR10 = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'cifar10.py')


def get_config(arg: str = 'wrn28_10'):
    model, opts = options(arg, 'wrn28_10', dataset='cifar10')
    c = from_file(f"{CIFAR10}:{model},dataset={opts['dataset']}")
    c.num_steps = None
    c.num_epochs = 200.0
    c.optim.nesterov = True
    c.optim.weight_decay = 5e-4
    c.optim.boundaries = ()
    c.optim.boundary_epochs = (60.0, 120.0, 160.0)
    c.optim.decay_factor = 0.2
    c.data.normalize = 'per_channel'     # mean/std whitening per channel (the authors' script)
    c.data.pad_mode = 'reflect'          # the authors' script pads by reflection
    c.data.pad_after_normalize = False   # reflection commutes with per-channel normalisation
    c.data.validation_split = 0          # all 50k training images
    c.model.bn_group_size = 0            # one BatchNorm over the batch of 128
    return c


def get_sweep(arg: str = ''):
    _, opts = options(arg, '', seeds=1)
    nets = [{'arg': 'wrn40_4'}, {'arg': 'wrn16_8'}, {'arg': 'wrn28_10'},
            {'arg': 'wrn28_10', 'model.dropout_rate': 0.3}]
    runs = [dict(net, arg=f"{net['arg']},dataset={data}") for data in ('cifar10', 'cifar100') for net in nets]
    return product(runs, seeds(opts['seeds']))
