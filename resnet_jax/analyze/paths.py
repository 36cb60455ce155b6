"""paths: the path-length distribution of an L-block ResNet and the gradient its paths carry (Veit et al.).

Unrolled, h_L = prod_l (I + F_l) h_0 is a sum over the 2^L subsets of blocks whose branch a path
goes through; the number of paths of length k is the coefficient of z^k in prod_l (1 + z), i.e.
Binomial(L, 1/2) times 2^L. The gradient carried by one path of length k is measured as Veit et
al. did: the forward pass is the whole network, and in the backward pass k sampled blocks send the
gradient through their branch only and the others through their shortcut only (the model's
`grad_route` hook), which leaves exactly one path. Its magnitude is the per-example norm of dL/dh_0
at the first block's input (root mean square over the batch), in eval mode. The total gradient
of length k is that magnitude times the number of such paths. Defined for residual nets only.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.analyze import common
from resnet_jax.analyze.gradient_flow import stream_gradients


def path_counts(num_blocks: int) -> list[int]:
    """Number of paths of each length 0..L: the coefficients of prod over blocks of (1 + z), exactly."""
    counts = [1]
    for _ in range(num_blocks):  # each block doubles the paths: skip it (same length) or take its branch (+1)
        counts = [a + b for a, b in zip(counts + [0], [0] + counts)]
    return counts


def path_length_distribution(num_blocks: int) -> np.ndarray:
    """The fraction of the 2^L paths that have each length 0..L: Binomial(L, 1/2)."""
    return np.array([c / 2 ** num_blocks for c in path_counts(num_blocks)])


def shortest_interval(weights, fraction: float) -> tuple[int, int]:
    """The shortest range [i, j] of indices whose weights sum to at least `fraction` of the total."""
    weights = np.asarray(weights, np.float64) / np.sum(weights)
    best = (0, len(weights) - 1)
    for i in range(len(weights)):
        total = np.cumsum(weights[i:])
        j = i + int(np.searchsorted(total, fraction - 1e-12))
        if j < len(weights) and j - i < best[1] - best[0]:
            best = (i, j)
    return best


def analyse(subjects, options: common.Options, out: str) -> list[str]:
    """Path-length distribution and the gradient carried by paths of each length for each residual
    subject (plain ones are skipped and said so), into `out`; the files written."""
    x, y = common.examples(subjects[0], options)
    x, y = x[:options.batch_size], y[:options.batch_size]
    results, rows, skipped = [], [], []
    for subject in subjects:
        if subject.kind == 'plain':
            skipped.append(subject.label)
            continue
        model, variables, num_blocks = subject.model, subject.variables, subject.num_blocks
        norm_at_input = jax.jit(lambda v, route: stream_gradients(model, v, x, y, False, grad_route=route)[1][0])
        scale = math.sqrt(len(x))  # ||d mean-loss / dh_0|| * sqrt(B) = RMS over examples of each one's gradient norm
        rng = np.random.default_rng(options.seed)
        counts = path_counts(num_blocks)
        lengths = []
        for k in range(num_blocks + 1):
            if counts[k] <= options.draws:  # few enough paths to measure every one
                subsets = [list(c) for c in itertools.combinations(range(num_blocks), k)]
            else:
                subsets = [rng.choice(num_blocks, k, replace=False).tolist() for _ in range(options.draws)]
            norms = []
            for chosen in subsets:
                route = jnp.zeros(num_blocks).at[jnp.asarray(chosen, jnp.int32)].set(1.0)
                norms.append(float(norm_at_input(variables, route)) * scale)
            mean = float(np.mean(norms))
            lengths.append({'k': k, 'paths': counts[k], 'fraction_of_paths': counts[k] / 2 ** num_blocks,
                            'gradient_mean': mean, 'gradient_std': float(np.std(norms)), 'samples': len(norms),
                            'total_gradient': counts[k] * mean})
        totals = [entry['total_gradient'] for entry in lengths]
        for entry in lengths:
            entry['fraction_of_gradient'] = entry['total_gradient'] / sum(totals)
            rows.append({'label': subject.label, **entry})
        results.append({'label': subject.label, 'blocks': num_blocks, 'step': subject.step, 'lengths': lengths,
                        'paths_95': shortest_interval(counts, 0.95), 'gradient_90': shortest_interval(totals, 0.9)})
    lines = [f'Batch of {len(x)} examples from the {options.split} split, eval mode; up to {options.draws} sampled '
             'paths per length (every path where there are no more).', '']
    for r in results:
        lines.append(f"- {r['label']}: {r['blocks']} blocks, 2^{r['blocks']} paths; 95% of paths have length "
                     f"{r['paths_95'][0]}-{r['paths_95'][1]}; 90% of the total gradient comes from lengths "
                     f"{r['gradient_90'][0]}-{r['gradient_90'][1]}.")
    if skipped:
        lines.append(f'- Not analysed (plain nets have a single path): {", ".join(skipped)}.')
    content = {'examples': len(x), 'draws': options.draws, 'subjects': results, 'skipped_plain': skipped}
    return common.write_results(out, 'paths', content, rows, [plot(results, out)], 'Paths (Veit et al.)', lines)


def plot(results, out: str) -> str:
    """Fraction of paths, gradient of one path and share of the total gradient against path length."""
    fig, axes = common.figure(1, 3, width=4.6)
    for r in results:
        k = [e['k'] for e in r['lengths']]
        axes[0, 0].bar(k, [e['fraction_of_paths'] for e in r['lengths']], alpha=0.6, label=r['label'])
        axes[0, 1].errorbar(k, [e['gradient_mean'] for e in r['lengths']], yerr=[e['gradient_std'] for e in r['lengths']],
                            marker='.', capsize=2, label=r['label'])
        axes[0, 2].plot(k, [e['fraction_of_gradient'] for e in r['lengths']], marker='.', label=r['label'])
    axes[0, 0].set(xlabel='path length k', ylabel='fraction of paths', title='path lengths: Binomial(L, 1/2)')
    axes[0, 1].set(xlabel='path length k', ylabel='||dL/dh_0|| per example', yscale='log',
                   title='gradient magnitude of one path')
    axes[0, 2].set(xlabel='path length k', ylabel='fraction of total', title='total gradient per path length')
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize='x-small')
    return common.save_figure(fig, out, 'paths.png')
