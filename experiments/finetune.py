"""Transfer: torchvision's ImageNet ResNet-50 fine-tuned on CIFAR-10 at 224x224, or linearly probed.

    # the weights, once, on a machine with internet access (or any ResNet-50 state_dict as .safetensors):
    wget https://download.pytorch.org/models/resnet50-11ad3fa6.pth            # IMAGENET1K_V2, 80.9% top-1
    tar xzf ../shared/data/cifar10-jpeg/cifar10_jpeg.tar.gz -C /tmp/cifar10   # once
    python -m resnet_jax.train --config=experiments/finetune.py --workdir=runs/r50_cifar10 \
        --config.init.source=torchvision:resnet50-11ad3fa6.pth
    python -m resnet_jax.train --config=experiments/finetune.py:probe --workdir=runs/r50_cifar10_probe \
        --config.init.source=torchvision:resnet50-11ad3fa6.pth

Arguments: '' (default) fine-tunes every layer; 'probe' trains only a new head on features computed
once (finetune.linear_probe); 'frozen' freezes the stem and stages 1-2 with their BatchNorms in eval
mode. The older IMAGENET1K_V1 file resnet50-0676ba61.pth (76.1%) works the same way.

Recipe: a new 10-way head (init.head='replace'); CIFAR-10's 32x32 images resized to 224 once, in
host memory (about 7.5 GB for the 50,000 training images; data.image_size=160 needs 3.8 GB and
trains about 2x faster), pad-4 crop and flip on the device; ImageNet normalisation, which the
pretrained stem expects; SGD with Nesterov momentum, batch 128, lr 0.01 with a cosine schedule
and a 500-step warm-up, weight decay 1e-4 not applied to norms and biases, 10 epochs (3,910 steps).
The probe trains the head with lr 0.1 for 40 epochs of features, without weight decay.

Hardware: one GPU (H100: the forward and backward pass of ResNet-50 at 224 runs at about 5,600
images/s in bf16, see docs/performance.md, so 10 epochs take roughly 3 minutes of
compute after the one-time decode; the probe's single feature pass over 60,000 images about 15 s).
Expected (published figures for ResNet-50 ImageNet -> CIFAR-10, Kornblith et al. 2019, "Do Better
ImageNet Models Transfer Better?"): fine-tuned about 97% top-1; a linear probe on the penultimate
features about 90%. The JPEG copy of CIFAR-10 is lossy, so expect a little less. Not yet run here.
"""

from resnet_jax.train.config import base_config

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def get_config(arg: str = ''):
    if arg not in ('', 'probe', 'frozen'):
        raise ValueError(f"experiments/finetune.py: argument {arg!r}; use '' (fine-tune), 'probe' or 'frozen'")
    c = base_config()
    c.model.name = 'resnet50'
    c.model.dtype = 'bfloat16'
    c.init.head = 'replace'
    c.data.dataset = 'folder:/tmp/cifar10'
    c.data.image_size = 224
    c.data.feed = 'host'
    c.data.augment = 'cifar'
    c.data.mean, c.data.std = IMAGENET_MEAN, IMAGENET_STD
    c.batch_size = 128
    c.eval.batch_size = 500
    c.num_epochs = 10.0
    c.optim.name = 'sgd'
    c.optim.nesterov = True
    c.optim.lr = 0.01
    c.optim.schedule = 'cosine'
    c.optim.warmup_steps = 500
    c.optim.weight_decay = 1e-4
    c.optim.decay_norm_and_bias = False
    c.eval.every_steps = 1_000
    c.checkpoint.every_steps = 1_000
    c.log.every_steps = 50
    if arg == 'probe':
        c.finetune.linear_probe = True
        c.num_epochs = 40.0
        c.optim.lr = 0.1
        c.optim.warmup_steps = 0
        c.optim.weight_decay = 0.0
    elif arg == 'frozen':
        c.finetune.freeze = ('params/stem_.*', 'params/stage[12]_.*')
        c.finetune.freeze_batch_stats = 'frozen'
    return c
