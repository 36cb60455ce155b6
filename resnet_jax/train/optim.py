"""Optimizers and learning-rate schedules from the config, as Optax transformations.

Weight decay comes in the two forms the literature uses: 'l2' adds wd * w to the gradient
before momentum (the ResNet papers' "weight decay 1e-4"), 'decoupled' adds it to the update
after momentum/Adam scaling (SGDW/AdamW). Either can skip norm parameters, biases and
scalar gains, which are the parameters with fewer than two dimensions (decay_norm_and_bias=False),
and the parameters named by the regular expressions of optim.decay_exclude (Goyal et al.: the BN
scales and biases only, not the classifier bias).

The run's length and the schedule's steps are computed here (`total_steps`, `schedule_steps`),
whether the config gives them in steps or in epochs, and `check_config` refuses an `optim` section
that cannot run.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from resnet_jax.errors import check_field_choice, check_field_regex, refuse
from resnet_jax.models import onednn
from resnet_jax.train import finetune

OPTIMIZERS = ('sgd', 'lars', 'adamw')
SCHEDULES = ('piecewise', 'cosine', 'constant')
WARMUPS = ('linear', 'constant', 'linear_from_base')
DECAY_TYPES = ('l2', 'decoupled')


def steps_per_epoch(config, num_train: int) -> float:
    """Train steps per pass over `num_train` examples at the global batch size (fractional)."""
    return num_train / config.batch_size


def total_steps(config, num_train: int) -> int:
    """The run's length in steps: num_steps, or num_epochs rounded to whole steps (at least one)."""
    if config.num_steps is not None:
        return config.num_steps
    return max(1, round(config.num_epochs * steps_per_epoch(config, num_train)))


def schedule_steps(config, num_train: int) -> tuple[list[int], int]:
    """(lr boundaries, warm-up length) in steps, whether the config gives them in steps or epochs."""
    o, per_epoch = config.optim, steps_per_epoch(config, num_train)
    boundaries = [int(b) for b in o.boundaries] or [round(e * per_epoch) for e in o.boundary_epochs]
    return boundaries, round(o.warmup_steps or o.warmup_epochs * per_epoch)


def check_config(config, model) -> None:
    """Refuse an optimizer or schedule that cannot run: unknown choices, decay_exclude patterns that
    match no parameter of `model`, a run length or schedule given both in steps and in epochs."""
    o = config.optim
    check_field_choice('optim.name', o.name, OPTIMIZERS)
    check_field_choice('optim.schedule', o.schedule, SCHEDULES)
    check_field_choice('optim.warmup', o.warmup, WARMUPS)
    check_field_choice('optim.decay_type', o.decay_type, DECAY_TYPES)
    _check_decay_exclude(config, model)
    if o.name == 'lars' and o.decay_type != 'l2':
        refuse('optim.decay_type', "LARS applies weight decay inside its trust ratio; use decay_type='l2'")
    if (config.num_steps is None) == (config.num_epochs is None):
        refuse('num_steps', 'set exactly one of num_steps and num_epochs '
                            f'(got num_steps={config.num_steps}, num_epochs={config.num_epochs})')
    if o.boundaries and o.boundary_epochs:
        refuse('optim.boundaries', 'give schedule boundaries in steps or in epochs (optim.boundary_epochs), not both')
    if o.warmup_steps and o.warmup_epochs:
        refuse('optim.warmup_steps', 'give the warm-up in steps or in epochs (optim.warmup_epochs), not both')


def check_schedule(config, num_train: int) -> None:
    """Refuse boundaries or a warm-up that fall outside the run, once the training set's size `num_train`
    turns epochs into steps (after `check_config`, which makes the run's length well defined)."""
    o = config.optim
    steps = total_steps(config, num_train)
    boundaries, warmup = schedule_steps(config, num_train)
    for b in boundaries if o.schedule == 'piecewise' else []:
        if not warmup < b < steps:
            refuse('optim.boundaries', f'boundary at step {b} is outside the run after warm-up '
                                       f'({warmup + 1}..{steps - 1}); training has {steps} steps')
    if warmup >= steps:
        refuse('optim.warmup_steps', f'warm-up of {warmup} steps does not end before the {steps} training steps')


def _check_decay_exclude(config, model) -> None:
    """optim.decay_exclude: regular expressions, each matching some parameter of the model."""
    patterns = config.optim.decay_exclude
    for pattern in patterns:
        check_field_regex('optim.decay_exclude', pattern)
    if not patterns:
        return
    params = finetune.variable_names(model, config.data.image_size)['params']
    for pattern in finetune.unmatched(patterns, params):
        refuse('optim.decay_exclude', f'{pattern!r} matches no parameter of {config.model.name}. Patterns are '
                                      f'fullmatched against paths such as {", ".join(params[:3])}, {params[-1]}')


def peak_lr(config) -> float:
    """The configured lr, scaled by batch / 256 under the linear scaling rule (Goyal et al.)."""
    return config.optim.lr * (config.batch_size / 256 if config.optim.scale_lr_by_batch else 1.0)


def lr_schedule(config, num_train: int) -> optax.Schedule:
    """The learning rate at every step: warm-up (if any), then the piecewise, cosine or constant schedule
    from the peak rate, over the run's length in steps."""
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


def member_lr_schedule(config, num_train: int, member) -> optax.Schedule:
    """`lr_schedule` for one member of a population, whose lr, warm-up length (in steps) and decay factor are
    traced scalars of `member` (see train.population): the same arithmetic as optax's schedules, written with
    jnp because their constructors branch on Python numbers."""
    o = config.optim
    steps = total_steps(config, num_train)
    boundaries, _ = schedule_steps(config, num_train)
    base, warmup, factor = member['lr'], member['warmup_steps'], member['decay_factor']
    lr = base * (config.batch_size / 256 if o.scale_lr_by_batch else 1.0)
    start = {'linear': 0.0, 'linear_from_base': base}.get(o.warmup)

    def schedule(step):
        count = step - warmup
        if o.schedule == 'piecewise':
            main = lr
            for b in boundaries:
                main = jnp.where(step < b, main, factor * main)
        elif o.schedule == 'cosine':
            decay_steps = jnp.maximum(1, steps - warmup).astype(jnp.float32)
            main = lr * (0.5 * (1 + jnp.cos(jnp.pi * jnp.minimum(count, decay_steps) / decay_steps)))
        else:
            main = lr
        if start is None:  # 'constant' warm-up
            ramp = lr * o.warmup_factor
        else:
            length = jnp.maximum(warmup, 1)
            ramp = (start - lr) * (1 - jnp.clip(step, 0, length) / length) + lr
        return jnp.where(step < warmup, ramp, main)

    return schedule


def make_optimizer(config, num_train: int, member=None) -> optax.GradientTransformation:
    """The whole update rule of config.optim (clipping, weight decay, SGD/AdamW/LARS, the lr schedule),
    restricted and scaled by config.finetune; `num_train` sets the length of epoch-based schedules.

    member: one population member's hyperparameters as traced scalars ('lr', 'momentum', 'weight_decay',
    'warmup_steps', 'decay_factor'; see train.population), replacing the config's. Momentum and weight decay
    are then always applied, so that every member has the same optimizer state (at 0 they change nothing)."""
    o = config.optim
    schedule = lr_schedule(config, num_train) if member is None else member_lr_schedule(config, num_train, member)
    weight_decay, momentum = (o.weight_decay, o.momentum) if member is None else (member['weight_decay'],
                                                                                  member['momentum'])
    mask = weight_decay_mask(config)
    decay = optax.add_decayed_weights(weight_decay, mask) if member is not None or o.weight_decay \
        else optax.identity()
    l2, decoupled = (decay, optax.identity()) if o.decay_type == 'l2' else (optax.identity(), decay)
    trace = optax.trace(momentum, o.nesterov) if member is not None or o.momentum else optax.identity()
    if o.name == 'sgd':
        core = [l2, trace, decoupled, optax.scale_by_learning_rate(schedule)]
    elif o.name == 'adamw':
        core = [l2, optax.scale_by_adam(o.b1, o.b2, o.eps), decoupled, optax.scale_by_learning_rate(schedule)]
    else:  # LARS (You et al.): a per-layer trust ratio; decay enters before the ratio, as in the paper
        trust = optax.scale_by_trust_ratio(trust_coefficient=o.lars_trust_coefficient, eps=o.eps)
        trust = optax.masked(trust, decay_mask)
        core = [decay, trust, optax.scale_by_learning_rate(schedule), trace]
    clip = [optax.clip_by_global_norm(o.grad_clip_norm)] if o.grad_clip_norm else []
    return finetune.wrap_optimizer(optax.chain(*clip, *core), config)  # frozen parameters, layer-wise lr


class InPlaceSgd(NamedTuple):
    """config.optim's plain SGD as numbers, for `sgd_in_place`: the lr schedule, momentum, Nesterov, the
    L2 weight decay and the function of the parameters that says which get it (None: all)."""
    schedule: optax.Schedule
    momentum: float
    nesterov: bool
    weight_decay: float
    decayed: object


def in_place_sgd(config, schedule: optax.Schedule) -> InPlaceSgd | None:
    """The rule of `make_optimizer`'s plain SGD (momentum, L2 or no weight decay, no clipping, nothing
    frozen or scaled per layer), which `sgd_in_place` can apply; None for any other optimizer."""
    o = config.optim
    plain = (o.name == 'sgd' and o.momentum and (o.decay_type == 'l2' or not o.weight_decay)
             and not o.grad_clip_norm and finetune.frozen_fn(config) is None and config.finetune.layer_lr_decay == 1.0)
    return InPlaceSgd(schedule, o.momentum, o.nesterov, o.weight_decay, weight_decay_mask(config)) if plain else None


def sgd_in_place(rule: InPlaceSgd | None, params, opt_state, grads, finite):
    """(params, opt_state) after `make_optimizer`'s update, computed in one in-place pass over every
    parameter (models.onednn.sgd_update), or None where that does not apply: not plain SGD (rule None),
    not the CPU backend's kernels, or a parameter that is not float32. On CPU, XLA computes optax's update
    in two loops per parameter that each recompute the new momentum, and copies every parameter and
    momentum because each loop reads the buffer the other overwrites (experiments/perf/CPU_NOTES.md, entry
    28); the results are the same to the bit, and `finite` False leaves both as they were."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    if rule is None or not onednn.applies() or any(p.dtype != jnp.float32 for p in leaves):
        return None
    count = optax.tree_utils.tree_get(opt_state, 'count')
    decayed = jax.tree_util.tree_leaves(rule.decayed(params)) if rule.decayed else [True] * len(leaves)
    new_params, momenta = onednn.sgd_update(
        leaves, tree.flatten_up_to(optax.tree_utils.tree_get(opt_state, 'trace')), tree.flatten_up_to(grads),
        -1 * rule.schedule(count), finite, momentum=rule.momentum, nesterov=rule.nesterov,
        decays=[rule.weight_decay if d else 0.0 for d in decayed])
    opt_state = optax.tree_utils.tree_set(opt_state, trace=tree.unflatten(momenta),
                                          count=jnp.where(finite, optax.safe_increment(count), count))
    return tree.unflatten(new_params), opt_state
