"""lesion: delete residual blocks at test time (Veit et al. 2016).

Deleting block l sets its branch output to zero where it joins the shortcut and keeps the shortcut
(the model's `keep` hook), so h_l = shortcut(h_{l-1}) passed through whatever follows the addition.
A plain net (skip='none') has no shortcut; the equivalent deletion replaces the block by the
identity, h_l = h_{l-1}, which exists only where the block keeps the shape of its input: its
downsampling blocks are never deleted and are listed as such. Reported: the error with each single
block deleted, and with k = 1..K random (deletable) blocks deleted over several draws, in eval mode
on the analysed examples.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.analyze import common
from resnet_jax.models import residual_stream


def deletable_blocks(model, variables, x) -> list[int]:
    """Indices of the blocks a lesion can remove: all of a residual net's, the shape-keeping ones of a plain net."""
    shapes = [s.shape for s in jax.eval_shape(lambda: residual_stream(model, variables, x[:1]))]
    return [l for l in range(len(shapes) - 1) if common.kind(model) == 'residual' or shapes[l] == shapes[l + 1]]


def evaluator(model, x, y, batch_size: int):
    """keep (L,) -> (mean loss, accuracy) over (x, y); one compiled step for every mask."""
    step = jax.jit(functools.partial(common.loss_and_correct, model))

    def evaluate(variables, keep) -> tuple[float, float]:
        totals = np.zeros(2)
        for xb, yb, mask in common.padded_batches(x, y, batch_size):
            totals += np.asarray(jax.device_get(step(variables, xb, yb, mask, keep=keep)))
        return totals[0] / len(x), totals[1] / len(x)
    return evaluate


def analyse(subjects, options: common.Options, out: str) -> list[str]:
    """Error of each subject with every single block deleted and with k random blocks deleted, into
    `out`; the files written."""
    x, y = common.examples(subjects[0], options)
    results, rows = [], []
    for subject in subjects:
        model, variables = subject.model, subject.variables
        num_blocks = subject.num_blocks
        evaluate = evaluator(model, x, y, options.batch_size)
        deletable = deletable_blocks(model, variables, x)
        full = jnp.ones(num_blocks)
        base_loss, base_acc = evaluate(variables, full)
        single = []
        for l in deletable:
            loss, acc = evaluate(variables, full.at[l].set(0.0))
            single.append({'block': l, 'name': model.block_names[l], 'loss': loss, 'accuracy': acc})
            rows.append({'label': subject.label, 'kind': subject.kind, 'deleted': model.block_names[l], 'k': 1,
                         'draw': '', 'loss': loss, 'accuracy': acc})
        rng = np.random.default_rng(options.seed)
        by_k = []
        for k in range(1, min(options.max_deleted, len(deletable)) + 1):
            accuracies = []
            for draw in range(options.draws):
                chosen = sorted(rng.choice(deletable, k, replace=False).tolist())
                loss, acc = evaluate(variables, full.at[jnp.asarray(chosen)].set(0.0))
                accuracies.append(acc)
                rows.append({'label': subject.label, 'kind': subject.kind,
                             'deleted': ' '.join(model.block_names[i] for i in chosen), 'k': k, 'draw': draw,
                             'loss': loss, 'accuracy': acc})
            by_k.append({'k': k, 'accuracy_mean': float(np.mean(accuracies)), 'accuracy_std': float(np.std(accuracies)),
                         'accuracies': accuracies})
        results.append({'label': subject.label, 'kind': subject.kind, 'step': subject.step, 'blocks': model.block_names,
                        'deletable': deletable,
                        'kept_in_place': [n for i, n in enumerate(model.block_names) if i not in deletable],
                        'baseline': {'loss': base_loss, 'accuracy': base_acc}, 'single': single, 'random': by_k})
    lines = [f'{len(x)} examples of the {options.split} split, eval mode. A residual block is deleted by zeroing '
             'its branch (shortcut kept); a plain block by replacing it with the identity, which only '
             'shape-keeping blocks allow.', '',
             '| subject | error % | error % with one block deleted (mean, worst) | blocks kept in place |',
             '|---|---|---|---|']
    for r in results:
        errors = [100 * (1 - s['accuracy']) for s in r['single']]
        lines.append(f"| {r['label']} ({r['kind']}) | {100 * (1 - r['baseline']['accuracy']):.2f} | "
                     f"{np.mean(errors):.2f}, {max(errors):.2f} | {', '.join(r['kept_in_place']) or 'none'} |")
    content = {'examples': len(x), 'split': options.split, 'draws': options.draws, 'subjects': results}
    return common.write_results(out, 'lesion', content, rows, [plot(results, out)], 'Block lesions', lines)


def plot(results, out: str) -> str:
    """Error against the deleted block, and against the number of random blocks deleted."""
    fig, axes = common.figure(1, 2)
    for r in results:
        colour = common.COLOURS[r['kind']]
        base = 100 * (1 - r['baseline']['accuracy'])
        axes[0, 0].plot([s['block'] + 1 for s in r['single']], [100 * (1 - s['accuracy']) for s in r['single']],
                        'o-', color=colour, label=f"{r['label']} ({r['kind']})")
        axes[0, 0].axhline(base, color=colour, linestyle=':', label=f"{r['label']}, nothing deleted")
        ks = [0] + [b['k'] for b in r['random']]
        means = [base] + [100 * (1 - b['accuracy_mean']) for b in r['random']]
        stds = [0] + [100 * b['accuracy_std'] for b in r['random']]
        axes[0, 1].errorbar(ks, means, yerr=stds, marker='o', capsize=3, color=colour,
                            label=f"{r['label']} ({r['kind']})")
    axes[0, 0].set(xlabel='deleted block', ylabel='error (%)', title='one block deleted')
    axes[0, 1].set(xlabel='number of deleted blocks k', ylabel='error (%)', title='k random blocks deleted')
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize='x-small')
    return common.save_figure(fig, out, 'lesion.png')
