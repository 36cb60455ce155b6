"""He et al. 2016b, Identity Mappings in Deep Residual Networks: Table 1 (what the shortcut
does, on ResNet-110) and Table 2 (where BN and ReLU sit, on ResNet-110 and ResNet-164), on CIFAR-10.

    python -m resnet_jax.sweep --config=experiments/identity_mappings.py:table1 --sweep_dir=runs/im_table1
    python -m resnet_jax.sweep --config=experiments/identity_mappings.py:table2,seeds=5 --sweep_dir=runs/im_table2
    python -m resnet_jax.sweep --config=experiments/identity_mappings.py:table1,seeds=5 --sweep_dir=runs/im_t1x5 \
        --population=8                             # 9 populations, one GPU
    python -m resnet_jax.sweep.results runs/im_table1
    python -m resnet_jax.train --config=experiments/identity_mappings.py:resnet110 --workdir=runs/r110_gate6 \
        --config.model.skip=exclusive_gate --config.model.gate_bias_init=-6.0    # one row by hand

Protocol (the paper's, for every CIFAR run): He et al.'s CIFAR-10 schedule of
experiments/cifar10.py (batch 128, lr 0.1 /10 at 32k and 48k, 64k iterations, wd 1e-4), with
lr 0.01 for the first 400 iterations on every net. The paper reports the median of 5 runs;
use ',seeds=5'. get_config's argument is the model: 'resnet110' (option A shortcuts) or
'preact_resnet164' (bottlenecks, projection shortcuts), changed by the sweep's overrides.

Protocol: experiments/cifar10.py's schedule with what the authors' code (a fork of
fb.resnet.torch) does: per-channel mean/std normalisation then zero padding, Nesterov momentum,
all 50k training images, BatchNorm over each GPU's 64 (2 GPUs), lr 0.01 for the first 400
iterations on every net. Deviations that remain: the JPEG copy of CIFAR-10; one device replaces
2 GPUs (the BN groups reproduce their statistics, running statistics average them); seeds.

Table 1 sweep, eleven rows on ResNet-110 (expected test error %, docs/reference_numbers.md; "fail" =
above 20%): original 6.61; constant scaling shortcut 0 / branch 1 fail, 0.5 / 1 fail,
0.5 / 0.5 12.35; exclusive gating with gate bias init 0 fail, -6 8.70, -7 9.81; shortcut-only
gating at 0 12.86, at -6 6.91; 1x1 conv shortcut 12.22; dropout 0.5 on the shortcut fail.
Table 2 sweep, five placements x {ResNet-110, ResNet-164}: original (post) 6.61 / 5.93; BN
after addition 8.17 / 6.50; ReLU before addition 7.84 / 6.14; ReLU-only pre-activation
6.71 / 5.91; full pre-activation 6.37 / 5.46.

Hardware: one GPU per run. Time on one H100 (projected from the measured ResNet-56, 8.1 min,
by the number of layers): ResNet-110 about 16 min, ResNet-164 about 25 min. Table 1 is about
3 h of runs, Table 2 about 3.5 h, per seed, one after another.
As populations (`--population=M`, one training per population, host feed), rows that differ only in
member values share one: Table 1's three constant-scaling rows, its three exclusive-gating rows and
its two shortcut-gating rows (`--dry_run` with --population=8: 3 populations of 3, 3 and 2, and 3 runs
alone: identity, 1x1 conv, dropout); with ',seeds=5' every row's seeds too (9 populations of 5 to 8
members). Table 2's placements change the network, so only its seeds share: ',seeds=5' gives 10
populations of 5 (one per row), one seed gives none. Projected H100 time of the training steps
(evaluation and compiles not counted), assuming that a population of M members at batch 128 steps as
fast as one run at batch 128*M (linear between the measured batch-128 and batch-1024 float32 ResNet-20
and ResNet-56 steps of experiments/perf/NOTES.md, linear in depth, extrapolated to 110 and 164 layers)
and that the host feed keeps up (neither it nor the vmapped convolutions' speed is measured):
Table 1 with 5 seeds 13.9 h of runs alone, 7.7 h as populations; with one seed 2.8 h, 2.1 h;
Table 2 with 5 seeds 15.6 h alone, 9.1 h as populations of 5.
"""

import os

from resnet_jax.sweep import options, product, seeds
from resnet_jax.train.config import from_file


def authors_code(c):
    """What He et al.'s code for the Identity Mappings paper (a fork of fb.resnet.torch) does where the
    paper says no more than "as in [ResNet]": per-channel mean/std normalisation, then zero padding for
    the crop (fb.resnet.torch's ColorNormalize before RandomCrop(32, 4)), Nesterov momentum
    (fb.resnet.torch's optimState), all 50k training images; 2 GPUs x 64 per BatchNorm (the paper)."""
    c.data.normalize = 'per_channel'
    c.data.pad_after_normalize = True
    c.data.validation_split = 0
    c.optim.nesterov = True
    c.model.bn_group_size = 64

CIFAR10 = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'cifar10.py')
TABLE1 = [
    {'model.skip': 'identity'},
    {'model.skip': 'scale', 'model.skip_scale': 0.0, 'model.branch_scale': 1.0},
    {'model.skip': 'scale', 'model.skip_scale': 0.5, 'model.branch_scale': 1.0},
    {'model.skip': 'scale', 'model.skip_scale': 0.5, 'model.branch_scale': 0.5},
    *({'model.skip': 'exclusive_gate', 'model.gate_bias_init': b} for b in (0.0, -6.0, -7.0)),
    *({'model.skip': 'shortcut_gate', 'model.gate_bias_init': b} for b in (0.0, -6.0)),
    {'model.skip': 'conv'},
    {'model.skip': 'dropout', 'model.skip_dropout': 0.5},
]
PLACEMENTS = ('post', 'bn_after_add', 'relu_before_add', 'relu_preact', 'preact')


def get_config(arg: str = 'resnet110'):
    c = from_file(f'{CIFAR10}:{arg}')
    authors_code(c)
    c.optim.warmup = 'constant'  # every CIFAR run of the paper: lr 0.01 for 400 iterations
    c.optim.warmup_steps = 400
    c.optim.warmup_factor = 0.1
    return c


def get_sweep(arg: str = 'table1'):
    table, opts = options(arg, 'table1', seeds=1)
    if table == 'table1':
        rows = [{'arg': 'resnet110', **row} for row in TABLE1]
    elif table == 'table2':
        rows = product({'arg': ['resnet110', 'preact_resnet164'], 'model.placement': list(PLACEMENTS)})
    else:
        raise ValueError(f'get_sweep({arg!r}): choose table1 or table2 (optionally with ,seeds=N)')
    return product(rows, seeds(opts['seeds']))
