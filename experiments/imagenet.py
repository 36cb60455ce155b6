"""ImageNet ResNet-18/34/50/101/152 with the recipe of Goyal et al. 2017 (ImageNet in 1 hour).

    python -m resnet_jax.train --config=experiments/imagenet.py:resnet50,hardware=gpu8 --workdir=runs/r50 \
        --config.data.tfds_data_dir=/data/tfds
    python -m resnet_jax.sweep --config=experiments/imagenet.py:hardware=gpu8 --sweep_dir=runs/imagenet \
        --launcher=slurm --nocheck_data        # or --launcher=local on one 8-GPU machine
    python -m resnet_jax.sweep.results runs/imagenet --metric=eval/top1,eval/top5

Recipe: SGD momentum 0.9, lr 0.1 per 256 images scaled linearly with the batch
(optim.scale_lr_by_batch), a 5-epoch linear warm-up from 0.1 to the scaled rate
(optim.warmup='linear_from_base'), lr /10 at epochs 30, 60 and 80, 90 epochs, weight decay
1e-4 on every parameter but BatchNorm's scale and bias (optim.decay_exclude; the classifier
bias is decayed), BatchNorm statistics over groups of 32 images as on each of the paper's GPUs
(model.bn_group_size=32, at every total batch), the classifier drawn from N(0, 0.01^2)
(model.head_init_std), zero-init of the last BN scale of every residual branch
(branch_init='zero_gamma'), Inception-style random-resized crops and flips at 224, a 224
centre crop of the image resized to 256 for evaluation, bfloat16 compute. Data: TFDS
'imagenet2012' prepared as ArrayRecord (docs/data.md, "Preparing TFDS datasets"), read by the
`stream` feed with Grain workers.

The argument is 'model,hardware=NAME'. The hardware fixes the global batch (and so the lr):
gpu1 = 1 GPU, batch 256; gpu8 = 8 GPUs (one node), 2,048; gpu32 = 32 GPUs, 8,192 (the
paper's large-batch setting); tpu_v4_32 = a v4-32 slice (16 chips), 4,096. The number of
processes and devices comes from the launch (SLURM tasks, TPU workers), not from here.
The sweep: resnet18/34/50/101/152 on the given hardware, over ',seeds=N' seeds.

Deviations that remain from the paper: bfloat16 compute (the paper: float32); images decoded
from TFDS's JPEGs with PIL (bilinear, antialiased resize) instead of Caffe2's OpenCV; the
global batch follows the hardware profile (the paper: 256 to 8k on 8 to 256 GPUs); running
statistics average the groups instead of keeping one GPU's; seeds differ.

Expected top-1 error % (docs/reference_numbers.md): ResNet-50 23.60 at batch 256 and 23.74 at
8k (Goyal et al.); torchvision's V1 weights, trained with a similar 90-epoch recipe, reach
30.24 / 26.69 / 23.87 / 22.63 / 21.69 for ResNet-18/34/50/101/152 (single 224 crop).
Time (projected, not measured): 90 epochs are 115M images. An H100 trains ResNet-50 at 5,600
images/s (Performance table), so about 5.7 h on gpu1 and 45 min on gpu8 if the input keeps
up; decoding with random-resized crops costs about 190 images/s per CPU core, so that needs
about 30 cores per GPU (data.workers); with the 12 workers set here expect about 2,300
images/s per GPU, i.e. about 14 h on gpu1 and 1.8 h on gpu8.
"""

from resnet_jax.sweep import options, product, seeds
from resnet_jax.train.config import base_config

IMAGENET_TRAIN = 1_281_167
# Global batch per hardware: 256 per GPU (ResNet-50 at 256 in bf16 takes 10 GiB of an H100), 256 per TPU v4 chip.
HARDWARE = {'gpu1': 256, 'gpu8': 2048, 'gpu32': 8192, 'tpu_v4_32': 4096}
MODELS = ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152')


def get_config(arg: str = 'resnet50,hardware=gpu8'):
    model, opts = options(arg, 'resnet50', hardware='gpu8')
    if opts['hardware'] not in HARDWARE:
        raise ValueError(f"hardware={opts['hardware']!r}: choose one of {', '.join(HARDWARE)}")
    batch = HARDWARE[opts['hardware']]
    epoch = round(IMAGENET_TRAIN / batch)
    c = base_config()
    c.model.name = model
    c.model.branch_init = 'zero_gamma'
    c.model.dtype = 'bfloat16'
    c.data.dataset = 'tfds:imagenet2012'
    c.data.eval_split = 'validation'
    c.data.feed = 'stream'
    c.data.workers = 12
    c.data.image_size = 224
    c.data.augment = 'inception'
    c.batch_size = batch
    c.eval.batch_size = batch
    c.num_epochs = 90.0
    c.optim.lr = 0.1
    c.optim.scale_lr_by_batch = True
    c.optim.momentum = 0.9
    c.optim.weight_decay = 1e-4
    c.optim.decay_exclude = (r'params/.*norm[0-9]*/(scale|bias)',)  # BN's gamma and beta only
    c.model.bn_group_size = 32           # BatchNorm statistics per 32 images, as per GPU in the paper
    c.model.head_init_std = 0.01         # the 1000-way classifier ~ N(0, 0.01^2)
    c.optim.schedule = 'piecewise'
    c.optim.boundary_epochs = (30.0, 60.0, 80.0)
    c.optim.warmup = 'linear_from_base'  # from 0.1 (the batch-256 rate) to 0.1 x batch / 256
    c.optim.warmup_epochs = 5.0
    c.eval.every_steps = 5 * epoch
    c.checkpoint.every_steps = epoch
    c.log.every_steps = 100
    return c


def get_sweep(arg: str = 'hardware=gpu8'):
    _, opts = options(arg, '', hardware='gpu8', seeds=1)
    return product([{'arg': f"{model},hardware={opts['hardware']}"} for model in MODELS], seeds(opts['seeds']))
