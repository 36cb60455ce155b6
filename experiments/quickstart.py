"""Quickstart: a CIFAR-style ResNet on the generated 'shapes' dataset, no download.

    python -m resnet_jax.train --config=experiments/quickstart.py --workdir=/tmp/quickstart

Hardware: any CPU (2 cores: about 3 minutes). Expected: eval/top1 above 0.9 on the 2,000
test images (chance is 0.1), a progress line every few seconds, and metrics.jsonl,
TensorBoard events, config.json, checkpoints/ and train_curves.png in the workdir.

The sweep (get_sweep) is this ResNet-8 and its plain twin (model.skip=none), 2 seeds each:

    python -m resnet_jax.sweep --config=experiments/quickstart.py --sweep_dir=/tmp/quickstart_sweep --local_parallel=2
    python -m resnet_jax.sweep.results /tmp/quickstart_sweep --metric=eval/top1,train/top1
"""

from resnet_jax.sweep import product, seeds
from resnet_jax.train.config import base_config


def get_config():
    c = base_config()
    c.model.name = 'resnet20'
    c.model.stage_sizes = (1, 1, 1)  # ResNet-8: small enough for a CPU
    c.data.dataset = 'shapes'
    c.data.image_size = 24
    c.data.num_train = 10_000
    c.data.num_eval = 2_000
    c.batch_size = 64
    c.num_steps = 600
    c.optim.lr = 0.1
    c.optim.schedule = 'cosine'
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 5e-4
    c.eval.every_steps = 200
    c.checkpoint.every_steps = 200
    c.log.every_steps = 20
    return c


def get_sweep(arg=None):
    return product({'model.skip': ['identity', 'none']}, seeds(2))
