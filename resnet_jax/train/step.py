"""The pure train and eval steps, and their compilation over a mesh.

`train_step(state, inputs, rng, *, to_batch, ...) -> (state, metrics)` and `eval_step(state, batch)`
are plain functions of arrays; `to_batch` (from the feed, `resnet_jax.data.feed`) turns the step's
input into its batch. `compile_steps` wraps them in `jax.jit` with the mesh's shardings and donates
the state. Every random draw of step t (augmentation, dropout, drop-path) comes from
`fold_in(rng, t)`, so a run is a function of its seed and the data order alone.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from resnet_jax import sharding
from resnet_jax.data import augment
from resnet_jax.data import feed as feed_lib
from resnet_jax.models import cpu_conv
from resnet_jax.train import finetune, optim
from resnet_jax.train.state import TrainState


def cross_entropy(logits, labels, num_classes: int):
    """Per-example softmax cross-entropy against integer labels (the loss every evaluation reports)."""
    return optax.softmax_cross_entropy(logits, jax.nn.one_hot(labels, num_classes))


def topk_correct(logits, labels, k: int):
    """1.0 where the label is among the k largest logits."""
    topk = jax.lax.top_k(logits, k)[1]
    return jnp.any(topk == labels[:, None], axis=-1).astype(jnp.float32)


def preprocess(rng, batch, config, num_classes: int, mean, std, label_smoothing=None, alphas=None):
    """(normalised images, soft targets) of a uint8 batch: the feed's on-device augmentation (the CIFAR
    crop pads before normalising, or after it with data.pad_after_normalize), label smoothing, then
    mixup/CutMix. label_smoothing: a population member's (traced), applied even at 0, where it changes
    nothing; None: config.optim's. alphas: a population member's traced 'mixup_alpha' / 'cutmix_alpha'
    where its members' differ (the others are config.data's)."""
    d = config.data
    crop = feed_lib.step_augmentation(config) == 'cifar'
    images = augment.cifar_augment(rng, batch['image'], d.pad_mode) if crop and not d.pad_after_normalize \
        else batch['image']
    x = augment.normalize(images, mean, std)
    if crop and d.pad_after_normalize:
        x = augment.cifar_augment(rng, x, d.pad_mode)
    targets = jax.nn.one_hot(batch['label'], num_classes)
    if label_smoothing is not None or config.optim.label_smoothing:
        targets = optax.smooth_labels(targets, config.optim.label_smoothing if label_smoothing is None
                                      else label_smoothing)
    alphas = alphas or {}
    if alphas or config.data.mixup_alpha or config.data.cutmix_alpha:
        x, targets = augment.mix(jax.random.fold_in(rng, 1), x, targets,
                                 alphas.get('mixup_alpha', config.data.mixup_alpha),
                                 alphas.get('cutmix_alpha', config.data.cutmix_alpha))
    return x, targets


def train_step(state: TrainState, inputs, rng, *, model, optimizer, config, mean, std, to_batch, member=None,
               in_place: optim.InPlaceSgd | None = None):
    """One SGD update on the batch `to_batch(inputs, state.step)`, returning the new state and the
    step's metrics; a non-finite loss or gradient leaves the state unchanged, so no NaN is ever saved.
    member: a population member's traced values (train.population), {'model': the model's `member` hook
    values, 'optim': its 'label_smoothing' and 'ema_decay' among others, 'data': its mixup/CutMix alphas
    where members differ}; the optimizer is then that
    member's too. None: the config's values, as a standalone run. in_place: `optim.in_place_sgd`'s rule,
    which the CPU applies in one pass (`optim.sgd_in_place`) instead of `optimizer`'s update."""
    batch = to_batch(inputs, state.step)
    step_rng = jax.random.fold_in(rng, state.step)
    augment_rng, dropout_rng = jax.random.split(step_rng)
    hyper = None if member is None else member['optim']
    x, targets = preprocess(augment_rng, batch, config, model.num_classes, mean, std,
                            None if hyper is None else hyper['label_smoothing'],
                            None if member is None else member.get('data'))
    apply = finetune.train_apply(model, config)  # model.apply, unless parts are frozen

    def loss_fn(params):
        logits, updates = apply({'params': params, 'batch_stats': state.batch_stats}, x, train=True,
                                mutable=['batch_stats'], rngs={'dropout': dropout_rng},
                                member=None if member is None else member['model'])
        loss = optax.softmax_cross_entropy(logits, targets).mean()
        return loss, (logits, updates.get('batch_stats', {}))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    # A non-finite loss or gradient leaves the state as it was (the loop stops or counts it, per
    # config.optim.nonfinite), so no NaN ever reaches the parameters or a checkpoint.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    guard = functools.partial(jax.tree_util.tree_map, lambda new, old: jnp.where(finite, new, old))
    updated = optim.sgd_in_place(in_place, state.params, state.opt_state, grads, finite)
    if updated is None:
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        updated = guard((optax.apply_updates(state.params, updates), opt_state), (state.params, state.opt_state))
    params, opt_state = updated
    ema = state.ema_params
    if ema is not None:
        decay = config.optim.ema_decay if hyper is None else hyper['ema_decay']
        ema = guard(jax.tree_util.tree_map(lambda e, p: decay * e + (1 - decay) * p, ema, params), ema)
    new = TrainState(step=state.step + 1, params=params, batch_stats=guard(batch_stats, state.batch_stats),
                     opt_state=opt_state, ema_params=ema)
    metrics = {'train/loss': loss, 'train/top1': topk_correct(logits, targets.argmax(-1), 1).mean(),
               'train/grad_norm': grad_norm, 'train/nonfinite': 1.0 - finite.astype(jnp.float32)}
    return new, metrics


def eval_sums(logits, labels, mask, num_classes: int) -> dict[str, jax.Array]:
    """Sums of the loss, top-1 and top-5 over the real examples (mask 1), and their count; sums, so
    that batches and processes add up before `metrics.means` divides once."""
    k = min(5, num_classes)
    return {'loss': (cross_entropy(logits, labels, num_classes) * mask).sum(),
            'top1': (topk_correct(logits, labels, 1) * mask).sum(),
            'top5': (topk_correct(logits, labels, k) * mask).sum(),
            'count': mask.sum()}


def eval_step(state: TrainState, batch, use_ema: bool = False, *, model, mean, std, member=None):
    """Sums over the real examples of a batch; padding rows carry mask 0 and count for nothing. member: a
    population member's model values (see `train_step`)."""
    params = state.ema_params if use_ema else state.params
    with cpu_conv.onednn_forward():  # on CPU, oneDNN's forward convs: PyTorch's rounding at its speed
        logits = model.apply({'params': params, 'batch_stats': state.batch_stats},
                             augment.normalize(batch['image'], mean, std), train=False, member=member)
    return eval_sums(logits, batch['label'], batch['mask'], model.num_classes)


def compile_steps(model, optimizer, config, mesh, state_shapes, mean, std, to_batch, in_place=None):
    """jit-compiled (train_step, eval_step, state shardings) over `mesh`; the state is donated.
    in_place: see `train_step`.

    The train step's second argument is what the feed's `next_input()` returns; `to_batch`
    (the feed's) turns it into the batch inside the step.
    """
    state_sharding = sharding.state_shardings(mesh, state_shapes, config)
    data, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    step_fn = functools.partial(train_step, model=model, optimizer=optimizer, config=config, mean=mean, std=std,
                                to_batch=to_batch, in_place=in_place)
    train = jax.jit(step_fn, in_shardings=(state_sharding, data, repl), out_shardings=(state_sharding, repl),
                    donate_argnums=0)
    evaluate = jax.jit(functools.partial(eval_step, model=model, mean=mean, std=std),
                       in_shardings=(state_sharding, data), out_shardings=repl, static_argnums=2)
    return train, evaluate, state_sharding
