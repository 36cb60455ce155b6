"""gradient-flow: per-block gradient norms of the residual stream and of the weights.

dL/dh_{l-1} = dL/dh_l (I + dF_l/dh_{l-1}) in a residual net, so the gradient reaching early blocks
always keeps the identity term; in a plain net it is the bare product of the branch Jacobians.
The gradient with respect to each h_l is taken by adding a zero offset to every block's output (and
to the first block's input, h_0) through `flax.linen.intercept_methods` and differentiating
against the offsets: the network itself is the one training runs. The loss is the batch-mean
cross-entropy of one batch, with BatchNorm in training mode by default (`--bn=eval`: running
statistics, which at initialisation are the identity and give the pure Jacobian product).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from resnet_jax.analyze import common
from resnet_jax.models import ResidualBlock, residual_stream


def stream_gradients(model, variables, x, y, train: bool, **hooks):
    """(loss, ||dL/dh_l|| for l = 0..L, ||dL/dW|| of each block's parameters) of the batch (x, y);
    `hooks` (keep, grad_route) go to the model."""
    names = model.block_names
    shapes = jax.eval_shape(lambda: residual_stream(model, variables, x))

    def loss_fn(params, offsets):
        def add_offsets(next_fun, args, kwargs, context):
            if not (isinstance(context.module, ResidualBlock) and context.method_name == '__call__'):
                return next_fun(*args, **kwargs)
            index = names.index(context.module.name)
            if index == 0:
                args = (args[0] + offsets[0],) + tuple(args[1:])
            return next_fun(*args, **kwargs) + offsets[index + 1]

        with nn.intercept_methods(add_offsets):
            return common.batch_loss(model, dict(variables, params=params), x, y, train, **hooks)

    offsets = [jnp.zeros(s.shape, s.dtype) for s in shapes]
    loss, (param_grads, stream_grads) = jax.value_and_grad(loss_fn, argnums=(0, 1))(variables['params'], offsets)
    return (loss, jnp.stack([jnp.linalg.norm(g) for g in stream_grads]),
            jnp.stack([optax.tree.norm(param_grads[name]) for name in names]))


def analyse(subjects, options: common.Options, out: str) -> list[str]:
    """Per-block gradient norms of each subject at initialisation and at its checkpoints, on one batch,
    into `out`; the files written."""
    x, y = common.examples(subjects[0], options)
    x, y = x[:options.batch_size], y[:options.batch_size]
    results, rows = [], []
    for subject in subjects:
        model = subject.model
        fn = jax.jit(lambda v, xb, yb: stream_gradients(model, v, xb, yb, options.bn == 'train'))
        states = []
        for step in [0] + [s for s in subject.checkpoint_steps() if s > 0]:
            loss, stream, weights = jax.device_get(fn(subject.variables_at(step), x, y))
            states.append({'step': step, 'loss': float(loss), 'stream_grad_norm': stream.tolist(),
                           'weight_grad_norm': weights.tolist()})
            for i, name in enumerate(['stem'] + model.block_names):
                rows.append({'label': subject.label, 'kind': subject.kind, 'step': step, 'index': i, 'block': name,
                             'stream_grad_norm': float(stream[i]),
                             'weight_grad_norm': float(weights[i - 1]) if i else ''})
        results.append({'label': subject.label, 'kind': subject.kind, 'blocks': model.block_names, 'states': states})
    lines = [f'Batch of {len(x)} examples from the {options.split} split, BatchNorm in {options.bn} mode.', '',
             '| subject | step | loss | dL/dh_0 | dL/dh_L | ratio h_0 / h_L |', '|---|---|---|---|---|---|']
    for r in results:
        for s in r['states']:
            g = s['stream_grad_norm']
            lines.append(f"| {r['label']} ({r['kind']}) | {s['step']} | {s['loss']:.4f} | {g[0]:.3g} | {g[-1]:.3g} | "
                         f'{g[0] / g[-1]:.3g} |')
    return common.write_results(out, 'gradient_flow', {'bn': options.bn, 'examples': len(x), 'subjects': results},
                                rows, [plot(results, out, options.bn)], 'Gradient flow', lines)


def plot(results, out: str, bn: str) -> str:
    """Stream-gradient and weight-gradient norms against block, a line per checkpoint (lighter: earlier)."""
    fig, axes = common.figure(1, 2)
    for r in results:
        colour = common.COLOURS[r['kind']]
        states = r['states']
        for j, s in enumerate(states):
            trained = j / max(len(states) - 1, 1)
            style = dict(color=colour, alpha=0.35 + 0.65 * trained, linestyle='--' if s['step'] == 0 else '-',
                         label=f"{r['label']} step {s['step']}")
            axes[0, 0].plot(np.arange(len(s['stream_grad_norm'])), s['stream_grad_norm'], marker='.', **style)
            axes[0, 1].plot(np.arange(1, len(s['weight_grad_norm']) + 1), s['weight_grad_norm'], marker='.', **style)
    axes[0, 0].set(xlabel='l (0 = stem output, L = last block)', ylabel='||dL/dh_l||',
                   title=f'residual stream gradient (BN {bn} mode)')
    axes[0, 1].set(xlabel='block', ylabel='||dL/dW_block||', title='weight gradient per block')
    for ax in axes[0]:
        ax.set_yscale('log')
        ax.grid(alpha=0.3, which='both')
        ax.legend(fontsize='x-small')
    return common.save_figure(fig, out, 'gradient_flow.png')
