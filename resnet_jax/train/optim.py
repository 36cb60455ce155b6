"""Optimizers and learning-rate schedules from the config, as Optax transformations.

Weight decay comes in the two forms the literature uses: 'l2' adds wd * w to the gradient
before momentum (the ResNet papers' "weight decay 1e-4"), 'decoupled' adds it to the update
after momentum/Adam scaling (SGDW/AdamW). Either can skip norm parameters, biases and
scalar gains, which are the parameters with fewer than two dimensions (decay_norm_and_bias=False),
and the parameters named by the regular expressions of optim.decay_exclude (Goyal et al.: the BN
scales and biases only, not the classifier bias).
"""

from __future__ import annotations

import re

import jax
import optax

from resnet_jax.train import finetune
from resnet_jax.train.config import schedule_steps, total_steps


def peak_lr(config) -> float:
    """The configured lr, scaled by batch / 256 under the linear scaling rule (Goyal et al.)."""
    return config.optim.lr * (config.batch_size / 256 if config.optim.scale_lr_by_batch else 1.0)


def lr_schedule(config, num_train: int) -> optax.Schedule:
    o = config.optim
    steps, lr = total_steps(config, num_train), peak_lr(config)
    boundaries, warmup = schedule_steps(config, num_train)
    if o.schedule == 'piecewise':
        main = optax.piecewise_constant_schedule(lr, {b - warmup: o.decay_factor for b in boundaries})
    elif o.schedule == 'cosine':
        main = optax.cosine_decay_schedule(lr, max(1, steps - warmup))
    else:
        main = optax.constant_schedule(lr)
    if not warmup:
        return main
    if o.warmup == 'linear':
        ramp = optax.linear_schedule(0.0, lr, warmup)
    elif o.warmup == 'linear_from_base':  # Goyal et al. 2.2: from the batch-256 rate to the scaled one
        ramp = optax.linear_schedule(o.lr, lr, warmup)
    else:  # He et al.'s ResNet-110: a low constant lr until training gets going
        ramp = optax.constant_schedule(lr * o.warmup_factor)
    return optax.join_schedules([ramp, main], [warmup])


def decay_mask(params):
    """True for the parameters that get weight decay: conv and dense kernels only."""
    return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


def weight_decay_mask(config):
    """The mask function of the parameters that get weight decay under config.optim, or None for all:
    multi-dimensional ones unless decay_norm_and_bias, minus those whose path ('params/a/b/kernel')
    fullmatches a pattern of decay_exclude."""
    o = config.optim
    patterns = [re.compile(p) for p in o.decay_exclude]
    if o.decay_norm_and_bias and not patterns:
        return None

    def decayed(path, p):
        name = 'params/' + jax.tree_util.keystr(path, simple=True, separator='/')
        return (o.decay_norm_and_bias or p.ndim > 1) and not any(q.fullmatch(name) for q in patterns)

    return lambda params: jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(config, num_train: int) -> optax.GradientTransformation:
    o = config.optim
    schedule = lr_schedule(config, num_train)
    mask = weight_decay_mask(config)
    decay = optax.add_decayed_weights(o.weight_decay, mask) if o.weight_decay else optax.identity()
    l2, decoupled = (decay, optax.identity()) if o.decay_type == 'l2' else (optax.identity(), decay)
    if o.name == 'sgd':
        direction = optax.trace(o.momentum, o.nesterov) if o.momentum else optax.identity()
        core = [l2, direction, decoupled, optax.scale_by_learning_rate(schedule)]
    elif o.name == 'adamw':
        core = [l2, optax.scale_by_adam(o.b1, o.b2, o.eps), decoupled, optax.scale_by_learning_rate(schedule)]
    else:  # LARS (You et al.): a per-layer trust ratio; decay enters before the ratio, as in the paper
        trust = optax.scale_by_trust_ratio(trust_coefficient=o.lars_trust_coefficient, eps=o.eps)
        trust = optax.masked(trust, decay_mask)
        core = [decay, trust, optax.scale_by_learning_rate(schedule),
                optax.trace(o.momentum, o.nesterov) if o.momentum else optax.identity()]
    clip = [optax.clip_by_global_norm(o.grad_clip_norm)] if o.grad_clip_norm else []
    return finetune.wrap_optimizer(optax.chain(*clip, *core), config)  # frozen parameters, layer-wise lr
