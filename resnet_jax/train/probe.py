"""Linear probe (`config.finetune.linear_probe`): the classifier head trained alone on features computed once.

The pooled vector the head reads (`ResNet(output='pooled')`) is computed once, in eval mode and
without augmentation, for every example of the training split (its evaluation views: the images
in memory, or the centre crops of the 'stream' feed) and of the evaluation split, and kept on the
devices. The head then trains on batches of those features drawn in the run's data order (batch t
holds positions t*B .. t*B+B-1 of the seed's per-epoch permutations) with the run's optimizer,
schedule, weight decay and label smoothing; everything else is frozen. A step is one
(B x D) x (D x classes) product instead of a pass through the network, and evaluation reads the
cached features too. Checkpoints hold the whole network with the trained head, so
`resnet_jax.evaluate` and `resnet_jax.export` work on the workdir as on any run, and a probe
started again in its workdir continues from its newest checkpoint.
"""

from __future__ import annotations

import functools
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from resnet_jax import sharding
from resnet_jax.data import arrays, augment, pipeline
from resnet_jax.train import config as config_lib
from resnet_jax.train import metrics as metrics_lib
from resnet_jax.train import step as step_lib
from resnet_jax.train.loop import NonFiniteError, Run
from resnet_jax.workdir import mark_done


def head_module(model, image_size: int) -> nn.Module:
    """The model's classifier head (its submodule 'head') as a module of its own, taken from an
    abstract forward pass, so that the probe trains exactly the layer the network applies."""
    found = {}

    def capture(next_fun, args, kwargs, context):
        if context.method_name == '__call__' and context.module.path == ('head',):
            found['head'] = context.module.clone(parent=None)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(capture):
        jax.eval_shape(functools.partial(step_lib.create_state, model, optax.identity(), image_size=image_size,
                                         ema=False), jax.random.key(0))
    return found['head']


def features(run: Run, state, source) -> dict[str, jax.Array]:
    """{'features', 'label', 'mask'} for every example of `source` in order, as global arrays split
    over the batch axes; rows past the end (the last batch's padding) have mask 0."""
    pooled = run.model.clone(output='pooled')

    @jax.jit
    def forward(params, batch_stats, images):
        return pooled.apply({'params': params, 'batch_stats': batch_stats},
                            augment.normalize(images, run.mean, run.std), train=False)

    parts = {'features': [], 'label': [], 'mask': []}
    for local in pipeline.eval_batches(run.config, source, jax.process_index(), jax.process_count()):
        batch = sharding.global_batch(local, run.mesh)
        parts['features'].append(forward(state.params, state.batch_stats, batch['image']))
        parts['label'].append(batch['label'])
        parts['mask'].append(batch['mask'])
    return {k: jnp.concatenate(v) for k, v in parts.items()}


def _weighted_mean(values, mask):
    return (values * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def probe_step(state, data, indices, *, head, optimizer, config, num_classes: int):
    """One update of the head on the cached features at `indices`; the rest of the state is untouched.
    A non-finite loss or gradient leaves the state as it was (as in the train step)."""
    x, labels, mask = (data[k][indices] for k in ('features', 'label', 'mask'))
    targets = jax.nn.one_hot(labels, num_classes)
    if config.optim.label_smoothing:
        targets = optax.smooth_labels(targets, config.optim.label_smoothing)

    def loss_fn(head_params):
        logits = head.apply({'params': head_params}, x).astype(jnp.float32)
        return _weighted_mean(optax.softmax_cross_entropy(logits, targets), mask), logits

    (loss, logits), grad = jax.value_and_grad(loss_fn, has_aux=True)(state.params['head'])
    # The optimizer sees the whole tree (its state is laid out for it); the frozen part's zero
    # gradients and updates are discarded, which XLA removes.
    grads = dict(jax.tree_util.tree_map(jnp.zeros_like, state.params), head=grad)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    grad_norm = optax.tree.norm(grad)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_head = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old),
                                      optax.apply_updates(state.params['head'], updates['head']), state.params['head'])
    opt_state = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), opt_state, state.opt_state)
    metrics = {'train/loss': loss, 'train/top1': _weighted_mean(step_lib.topk_correct(logits, labels, 1), mask),
               'train/grad_norm': grad_norm, 'train/nonfinite': 1.0 - finite.astype(jnp.float32)}
    return state.replace(step=state.step + 1, params=dict(state.params, head=new_head), opt_state=opt_state), metrics


def probe_eval(head_params, data, *, head, num_classes: int) -> dict[str, jax.Array]:
    """Sums of the loss, top-1 and top-5 of the head over the cached evaluation features, and the count
    (padding masked), as `step.eval_step` returns them."""
    logits = head.apply({'params': head_params}, data['features']).astype(jnp.float32)
    labels, mask = data['label'], data['mask']
    k = min(5, num_classes)
    return {'loss': (step_lib.cross_entropy(logits, labels, num_classes) * mask).sum(),
            'top1': (step_lib.topk_correct(logits, labels, 1) * mask).sum(),
            'top5': (step_lib.topk_correct(logits, labels, k) * mask).sum(), 'count': mask.sum()}


def _means(totals, prefix: str = 'eval') -> dict[str, float]:
    """<prefix>/* means from `probe_eval`'s sums, divided on the host as `Run.evaluate` divides them."""
    totals = jax.device_get(totals)
    count = float(totals.pop('count'))
    return {f'{prefix}/{k}': float(v) / count for k, v in totals.items()}


def train_head(run: Run, state, manager, workdir: str) -> dict[str, float]:
    """The linear probe of `run` from `state` (a new run's first state or a restored one); returns
    the final metrics. Writes metrics, checkpoints and the done marker as the training loop does."""
    config, lead = run.config, jax.process_index() == 0
    start = int(jax.device_get(state.step))
    writer = metrics_lib.MetricWriter(workdir, enabled=lead)
    progress = metrics_lib.ProgressLogger(run.num_steps, config.log.progress_seconds,
                                          print_fn=functools.partial(print, flush=True) if lead else (lambda *_: None))
    try:
        t0 = time.perf_counter()
        train = features(run, state, run.train_data)
        # The test split as 'eval/*' and the held-out training examples (data.validation_split) as 'val/*'.
        evaluation = {prefix: features(run, state, data) for prefix, data in
                      (('eval', run.eval_data), ('val', run.val_data)) if data is not None}
        jax.block_until_ready((train, evaluation))
        writer.write(start, {'probe/feature_seconds': time.perf_counter() - t0,
                             'probe/feature_dim': train['features'].shape[-1]})
        head, classes = head_module(run.model, config.data.image_size), run.model.num_classes
        data, repl = sharding.batch_sharding(run.mesh), sharding.replicated(run.mesh)
        step_fn = jax.jit(functools.partial(probe_step, head=head, optimizer=run.optimizer, config=config,
                                            num_classes=classes),
                          in_shardings=(run.state_sharding, data, repl), out_shardings=(run.state_sharding, repl),
                          donate_argnums=0)
        eval_fn = jax.jit(functools.partial(probe_eval, head=head, num_classes=classes))

        def evaluate(state):
            return {k: v for prefix, data in evaluation.items()
                    for k, v in _means(eval_fn(state.params['head'], data), prefix).items()}

        num_train = len(run.train_data)
        final, pending, skipped = {}, [], 0
        for step in range(start, run.num_steps):
            indices = arrays.train_indices(num_train, config.batch_size, config.seed, step).astype(np.int32)
            state, metrics = step_fn(state, train, indices)
            pending.append(metrics)
            done = step + 1
            last = done == run.num_steps
            if done % config.log.every_steps == 0 or last:
                pending = jax.device_get(pending)
                flags = [float(m.pop('train/nonfinite')) for m in pending]
                if config.optim.nonfinite == 'stop' and any(flags):
                    raise NonFiniteError(f'non-finite loss or gradient of the probe at step '
                                         f'{done - len(flags) + flags.index(1.0)}; its update was not applied')
                skipped += int(sum(flags))
                values = {k: float(np.mean([m[k] for m in pending])) for k in pending[0]}
                values.update({'train/lr': float(run.schedule(done - 1)), 'train/skipped_updates': skipped})
                writer.write(done, values)
                progress.maybe_log(done, values)
                final.update(values)
                pending = []
            results = None
            if done % config.eval.every_steps == 0 or last:
                results = evaluate(state)
                writer.write(done, results)
                if lead:
                    print(f'step {done}: ' + ', '.join(f'{k} {v:.4f}' for k, v in results.items()), flush=True)
                final.update(results)
            if done % config.checkpoint.every_steps == 0 or last:
                meta = {'config': json.loads(config_lib.to_json(config)), 'metrics': final, 'skipped_updates': skipped}
                manager.save(done, state, {'step': done}, meta, metrics=results)  # the order is (seed, step)
        if start >= run.num_steps:  # a finished probe: report, change nothing
            final = evaluate(state)
            writer.write(run.num_steps, final)
    finally:
        manager.close()
        writer.close()
    if lead:
        metrics_lib.plot_curves(workdir)
        mark_done(workdir, run.num_steps, final)
    return final
