"""signal: per-block statistics of the residual stream and of each branch (signal-propagation plots).

As in Brock et al.'s NF-ResNet papers, for every h_l (the stem output h_0 and each block's output)
and for what each branch added: the average squared channel mean, the average channel variance
(channel statistics over batch and positions, averaged over channels) and the overall mean. A
ResNet's stream variance grows with depth while a normalised branch stays near 1; a plain net's
stream is its branch. Read from the activations the model sows into 'intermediates', at
initialisation and at the analysed checkpoint.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from resnet_jax.analyze import common

QUANTITIES = ('mean', 'sq_channel_mean', 'channel_var')


def channel_statistics(h) -> dict:
    """{'mean', 'sq_channel_mean', 'channel_var'} of activations h (channels last), the
    signal-propagation quantities."""
    axes = tuple(range(h.ndim - 1))
    h = h.astype(jnp.float32)
    return {'mean': h.mean(), 'sq_channel_mean': jnp.mean(h.mean(axes) ** 2), 'channel_var': jnp.mean(h.var(axes))}


def statistics(model, variables, x, train: bool) -> dict:
    """{'stream': {q: (L+1,)}, 'branch': {q: (L,)}} for each quantity q of `channel_statistics`."""
    mutable = ['intermediates', 'batch_stats'] if train else ['intermediates']
    _, state = model.apply(variables, x, train=train, mutable=mutable, rngs={'dropout': jax.random.key(0)})
    inter = state['intermediates']
    stream = [inter['stem'][0]] + [inter[n]['output'][0] for n in model.block_names]
    branch = [inter[n]['branch'][0] for n in model.block_names]
    stack = lambda hs: {q: jnp.stack([channel_statistics(h)[q] for h in hs]) for q in QUANTITIES}
    return {'stream': stack(stream), 'branch': stack(branch)}


def analyse(subjects, options: common.Options, out: str) -> list[str]:
    """Per-block statistics of the stream and the branches of each subject at initialisation and at its
    checkpoint, into `out`; the files written."""
    x, _ = common.examples(subjects[0], options)
    x = x[:options.batch_size]
    results, rows = [], []
    for subject in subjects:
        model = subject.model
        fn = jax.jit(lambda v, xb: statistics(model, v, xb, options.bn == 'train'))
        states = []
        for step in sorted({0, subject.step}):
            stats = jax.tree_util.tree_map(lambda a: a.tolist(), jax.device_get(
                fn(subject.variables if step == subject.step else subject.variables_at(step), x)))
            states.append({'step': step, **stats})
            for where, values in stats.items():
                names = (['stem'] if where == 'stream' else []) + model.block_names
                for i, name in enumerate(names):
                    rows.append({'label': subject.label, 'kind': subject.kind, 'step': step, 'tensor': where,
                                 'block': name, **{q: values[q][i] for q in QUANTITIES}})
        results.append({'label': subject.label, 'kind': subject.kind, 'blocks': model.block_names, 'states': states})
    lines = [f'Batch of {len(x)} examples from the {options.split} split, BatchNorm in {options.bn} mode.', '',
             '| subject | step | channel var of h_0 | of h_L | mean branch channel var |', '|---|---|---|---|---|']
    for r in results:
        for s in r['states']:
            v, b = s['stream']['channel_var'], s['branch']['channel_var']
            lines.append(f"| {r['label']} ({r['kind']}) | {s['step']} | {v[0]:.3g} | {v[-1]:.3g} | "
                         f'{sum(b) / len(b):.3g} |')
    return common.write_results(out, 'signal', {'bn': options.bn, 'examples': len(x), 'subjects': results}, rows,
                                [plot(results, out, options.bn)], 'Signal propagation', lines)


def plot(results, out: str, bn: str) -> str:
    """Channel variance and squared channel mean of the stream, and the branch variance, against block."""
    panels = [('stream', 'channel_var', 'average channel variance of h_l'),
              ('stream', 'sq_channel_mean', 'average squared channel mean of h_l'),
              ('branch', 'channel_var', 'average channel variance of branch l')]
    fig, axes = common.figure(1, 3, width=4.6)
    for ax, (where, quantity, title) in zip(axes[0], panels):
        for r in results:
            for s in r['states']:
                values = s[where][quantity]
                start = 0 if where == 'stream' else 1
                ax.plot(range(start, start + len(values)), values, marker='.', color=common.COLOURS[r['kind']],
                        linestyle='--' if s['step'] == 0 else '-', label=f"{r['label']} step {s['step']}")
        ax.set(xlabel='block l (0 = stem)', title=title, yscale='log')
        ax.grid(alpha=0.3, which='both')
        ax.legend(fontsize='x-small')
    fig.suptitle(f'signal propagation (BN {bn} mode; dashed: initialisation)')
    return common.save_figure(fig, out, 'signal.png')
