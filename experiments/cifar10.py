"""He et al. 2016, CIFAR-10 (Table 6): ResNet-20/32/44/56/110 and their plain twins.

    tar xzf ../shared/data/cifar10-jpeg/cifar10_jpeg.tar.gz -C /tmp/cifar10   # once
    python -m resnet_jax.train --config=experiments/cifar10.py:resnet56 --workdir=runs/resnet56 \
        --config.data.dataset=folder:/tmp/cifar10

The paper's protocol: batch 128, SGD momentum 0.9, weight decay 1e-4 (L2, on every
parameter), lr 0.1 divided by 10 at 32k and 48k iterations, 64k iterations, pad-4 crop and
flip; ResNet-110 (and deeper) warms up at lr 0.01 for 400 iterations. The argument is any
CIFAR preset (resnet20..resnet1202, plain20..plain110, or another registry name).

Hardware: one GPU. Expected test error (REFERENCE_NUMBERS.md): 8.75 / 7.51 / 7.17 / 6.97 /
6.43 % for ResNet-20/32/44/56/110 on the original CIFAR-10; the JPEG copy in
../shared/data is lossy, so expect somewhat higher errors there. Plain nets get worse with
depth (plain-56 trains worse than plain-20). Here, on 2 CPU cores, a run of ResNet-20 takes
hours; use --config.num_steps for a smoke test.
"""

from resnet_jax.train.config import base_config


def get_config(arg: str = 'resnet20'):
    c = base_config()
    c.model.name = arg
    c.data.dataset = 'folder:/tmp/cifar10'
    c.data.image_size = 32
    c.data.augment = 'cifar'
    c.batch_size = 128
    c.eval_batch_size = 500
    c.num_steps = 64_000
    c.optim.name = 'sgd'
    c.optim.lr = 0.1
    c.optim.momentum = 0.9
    c.optim.weight_decay = 1e-4
    c.optim.schedule = 'piecewise'
    c.optim.boundaries = (32_000, 48_000)
    if arg in ('resnet110', 'resnet1202', 'plain110'):
        c.optim.warmup = 'constant'
        c.optim.warmup_steps = 400
        c.optim.warmup_factor = 0.1
    c.eval_every_steps = 2_000
    c.checkpoint_every_steps = 2_000
    c.log_every_steps = 100
    return c
