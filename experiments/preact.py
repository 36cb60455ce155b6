"""He et al. 2016b, Identity Mappings, Tables 3/4: pre-activation ResNet-164 and ResNet-1001 on
CIFAR-10 and CIFAR-100.

    python -m resnet_jax.train --config=experiments/preact.py:preact_resnet1001 --workdir=runs/preact1001
    python -m resnet_jax.train --config=experiments/preact.py:preact_resnet164,dataset=cifar100 --workdir=runs/p164_c100
    python -m resnet_jax.sweep --config=experiments/preact.py --sweep_dir=runs/preact --launcher=local
    python -m resnet_jax.sweep.results runs/preact

Protocol: He et al.'s CIFAR schedule (experiments/cifar10.py: batch 128, lr 0.1 /10 at 32k and
48k iterations, 64k iterations, wd 1e-4, pad-4 crop and flip) with lr 0.01 for the first 400
iterations, full pre-activation bottleneck units (BN-ReLU-conv) and projection shortcuts.
CIFAR-10 is the JPEG folder (/tmp/cifar10); CIFAR-100 is TFDS 'cifar100' prepared as
ArrayRecord (docs/data.md, "Preparing TFDS datasets"). The sweep is {164, 1001} x {CIFAR-10,
CIFAR-100}, over ',seeds=N' seeds.

Like identity_mappings.py it follows the authors' fb.resnet.torch code where the paper is silent:
per-channel mean/std normalisation then zero padding, Nesterov momentum, all 50k training
images, BatchNorm over each GPU's 64 of 128. Deviations that remain: the JPEG copy of
CIFAR-10; one device replaces 2 GPUs (BN groups reproduce their statistics, running statistics
average them); seeds.

Expected test error % (docs/reference_numbers.md): ResNet-164 pre-act 5.46 (CIFAR-10) / 24.33
(CIFAR-100); ResNet-1001 pre-act (10.2M parameters) 4.92 / 22.71.
Hardware: one GPU per run; ResNet-1001 is deep (333 blocks) but small, so add
--config.model.remat=true if memory is short. Time on one H100 (projected from the measured
ResNet-56, 8.1 min, by depth: small CIFAR nets are bound by per-layer launches): ResNet-164
about 25 min, ResNet-1001 about 2 h; the sweep about 5 h per seed, one run after another.
"""

import os

from resnet_jax.sweep import options, product, seeds
from resnet_jax.train.config import config_module, from_file

CIFAR10 = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'cifar10.py')
authors_code = config_module(os.path.join(os.path.dirname(CIFAR10), 'identity_mappings.py')).authors_code


def get_config(arg: str = 'preact_resnet164'):
    model, opts = options(arg, 'preact_resnet164', dataset='cifar10')
    c = from_file(f"{CIFAR10}:{model},dataset={opts['dataset']}")
    authors_code(c)
    c.optim.warmup = 'constant'
    c.optim.warmup_steps = 400
    c.optim.warmup_factor = 0.1
    return c


def get_sweep(arg: str = ''):
    _, opts = options(arg, '', seeds=1)
    runs = [{'arg': f'preact_resnet{depth},dataset={data}'}
            for depth in (164, 1001) for data in ('cifar10', 'cifar100')]
    return product(runs, seeds(opts['seeds']))
