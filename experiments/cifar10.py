"""He et al. 2016, CIFAR-10 (Table 6): ResNet-20/32/44/56/110 and their plain twins.

    tar xzf ../shared/data/cifar10-jpeg/cifar10_jpeg.tar.gz -C /tmp/cifar10   # once
    python -m resnet_jax.train --config=experiments/cifar10.py:resnet56 --workdir=runs/resnet56 \
        --config.data.dataset=folder:/tmp/cifar10
    python -m resnet_jax.sweep --config=experiments/cifar10.py --sweep_dir=runs/table6 --launcher=local
    python -m resnet_jax.sweep --config=experiments/cifar10.py --sweep_dir=runs/table6_gpu --only='20|56' \
        --local_parallel=4 --local_memory_fraction=0.2 --config.data.feed=device   # 4 runs on one GPU
    python -m resnet_jax.sweep --config=experiments/cifar10.py:seeds=5 --sweep_dir=runs/table6x5 --launcher=local
    python -m resnet_jax.sweep --config=experiments/cifar10.py:seeds=5 --sweep_dir=runs/table6x5 \
        --population=10                            # 5 populations (one per depth), one GPU
    python -m resnet_jax.sweep.results runs/table6 --metric=eval/top1,train/top1

The paper's protocol: batch 128, SGD momentum 0.9, weight decay 1e-4 (L2, on every
parameter), lr 0.1 divided by 10 at 32k and 48k iterations, 64k iterations, pad-4 crop and
flip, the per-pixel mean subtracted (data.normalize='per_pixel_mean'; the image minus the mean
training image, then zero-padded, so the padding is the mean), BatchNorm statistics over each
GPU's 64 of the 128 (2 GPUs, not synchronised: model.bn_group_size=64), the running variance
kept unbiased as Caffe/PyTorch do; ResNet-110 (and deeper) warms up at lr 0.01 for 400
iterations. 5,000 training images are held out (data.validation_split) and evaluated as
'val/*' beside the test set: the schedule was chosen on a 45k/5k split, and `results` picks
nothing on the test set. The argument of
get_config is any CIFAR preset (resnet20..resnet1202, plain20..plain110, or another registry
name), optionally with ',dataset=cifar100' (TFDS 'cifar100', prepared as ArrayRecord) instead
of the CIFAR-10 JPEG folder. The sweep (get_sweep) is the ten nets of Table 6 and Figure 6,
ResNet-20..110 and plain-20..110, each repeated over 'seeds=N' seeds (default 1).

Hardware: one GPU per run. Time per run on one H100 (device feed, float32, from the
Performance table): ResNet-20 3.3 min, ResNet-56 8.1 min, ResNet-110 about 16 min
(projected); the whole sweep about 1.5 h one run after another. On 2 CPU cores a ResNet-20
run takes hours; use --config.num_steps for a smoke test.
As populations (`--population=M`, one training per population, host feed): each ResNet and its
plain twin share one network, so the seeds of both share a population per depth. `--dry_run` groups
the default sweep with --population=2 into 5 populations of 2 (resnetN + plainN), and 'seeds=5' with
--population=10 into 5 populations of 10 (with --population=8: 10 populations of 5, one per net).
Projected H100 time of the training steps (evaluation and compiles not counted), assuming that a
population of M members at batch 128 steps as fast as one run at batch 128*M (linear between the
measured batch-128 and batch-1024 float32 steps of experiments/perf/NOTES.md: ResNet-20 3.13 / 10.93 ms,
ResNet-56 7.55 / 30.98 ms, linear in depth, extrapolated to ResNet-110 and to M=10), and that the host
feed keeps up (not measured; the vmapped convolutions' speed neither): 'seeds=5' 6.3 h one run after
another, 3.1 h as 5 populations of 10 (ResNet-110's: 74 ms a step, 80 min); the default sweep 1.3 h
alone, 0.9 h as 5 populations of 2.
Deviations that remain from the paper: the data is a JPEG copy of CIFAR-10 (lossy, see
below); the paper does not say whether its final nets trained on 45k or on all 50k images
(this trains on 45k; --config.data.validation_split=0 trains on 50k) nor whether it padded
before or after subtracting the mean, nor the input scale (here [0, 1] minus the mean);
one device replaces 2 GPUs (the BN groups reproduce their statistics); seeds and cuDNN
nondeterminism differ; running statistics average the two groups instead of keeping one GPU's.
Expected test error (docs/reference_numbers.md): 8.75 / 7.51 / 7.17 / 6.97 / 6.43 % for
ResNet-20/32/44/56/110 on the original CIFAR-10 (6.61 ± 0.16 mean of 5 for ResNet-110); the
JPEG copy in ../shared/data is lossy, so expect somewhat higher errors there. Plain nets get
worse with depth in training and test error (plain-56 worse than plain-20; plain-110 above 60%).
"""

from resnet_jax.sweep import options, product, seeds
from resnet_jax.train.config import base_config

DATASETS = {'cifar10': 'folder:/tmp/cifar10', 'cifar100': 'tfds:cifar100'}
DEPTHS = (20, 32, 44, 56, 110)


def get_config(arg: str = 'resnet20'):
    model, opts = options(arg, 'resnet20', dataset='cifar10')
    if opts['dataset'] not in DATASETS:
        raise ValueError(f"dataset={opts['dataset']!r}: choose one of {', '.join(DATASETS)}")
    c = base_config()
    c.model.name = model
    c.data.dataset = DATASETS[opts['dataset']]
    c.data.image_size = 32
    c.data.augment = 'cifar'
    c.data.normalize = 'per_pixel_mean'  # He et al. 2016, 4.2: "the per-pixel mean subtracted"
    c.data.pad_after_normalize = True    # subtract the mean image, then pad: the padding is the mean
    c.data.validation_split = 5_000      # the paper's 45k/5k split; 'val/*' is evaluated beside the test set
    c.model.bn_group_size = 64           # 2 GPUs x 64, BatchNorm not synchronised
    c.batch_size = 128
    c.eval.batch_size = 500
    c.num_steps = 64_000
    c.optim.name = 'sgd'
    c.optim.lr = 0.1
    c.optim.momentum = 0.9
    c.optim.weight_decay = 1e-4
    c.optim.schedule = 'piecewise'
    c.optim.boundaries = (32_000, 48_000)
    if model in ('resnet110', 'resnet1202', 'plain110'):
        c.optim.warmup = 'constant'
        c.optim.warmup_steps = 400
        c.optim.warmup_factor = 0.1
    c.eval.every_steps = 2_000
    c.checkpoint.every_steps = 2_000
    c.log.every_steps = 100
    return c


def get_sweep(arg: str = ''):
    _, opts = options(arg, '', seeds=1)
    nets = [{'arg': f'{family}{depth}'} for family in ('resnet', 'plain') for depth in DEPTHS]
    return product(nets, seeds(opts['seeds']))
