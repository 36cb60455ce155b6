"""landscape: loss and accuracy around the trained weights along filter-normalised random directions (Li et al.).

A direction d is a Gaussian draw shaped like the parameters; each filter of d (per output channel
of a conv kernel, per output unit of a dense kernel) is rescaled to the norm of the same filter of
the weights, and every parameter of rank <= 1 (BatchNorm scales and biases, biases, scalar gains)
is zeroed. The tool evaluates L(theta + a d1) on a line and L(theta + a d1 + b d2) on a grid over
[-span, span], without augmentation and with BatchNorm in eval mode using the trained running
statistics, as Li et al. do. Grid points are evaluated in chunks: `jax.vmap` over the points of a
chunk (on one CPU device a loop over them, `cpu_conv.looped`), the chunk axis sharded over the run's
mesh, so each compiled call computes points_per_device x devices points on a batch of examples.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import sharding
from resnet_jax.analyze import common
from resnet_jax.models import cpu_conv

SURFACE_CAP = 10.0  # losses above this are clipped in the surface and contour plots (not in the data)


def filter_normalized_direction(key, params):
    """A random direction shaped like `params`, each filter scaled to the norm of the
    same filter of the weights and rank <= 1 parameters zeroed (Li et al.), so that directions are comparable
    across nets whose weights differ in scale."""
    leaves, treedef = jax.tree_util.tree_flatten(params)

    def direction(k, w):
        if w.ndim <= 1:
            return jnp.zeros_like(w)
        d = jax.random.normal(k, w.shape, w.dtype)
        axes = tuple(range(w.ndim - 1))  # the last axis indexes the filters (HWIO kernels, (in, out) dense)
        norm = lambda a: jnp.sqrt(jnp.sum(a * a, axis=axes, keepdims=True))
        return d * norm(w) / (norm(d) + 1e-10)

    return treedef.unflatten([direction(k, w) for k, w in zip(jax.random.split(key, len(leaves)), leaves)])


def point_evaluator(model, variables, directions, x, y, batch_size: int, mesh, points_per_device: int):
    """coords (P, 2) -> (mean loss, accuracy) over (x, y) at theta + a d1 + b d2 for each row (a, b)."""
    points, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)

    def at_point(ab, params, stats, d1, d2, xb, yb, mask):
        moved = jax.tree_util.tree_map(lambda w, u, v: w + ab[0] * u + ab[1] * v, params, d1, d2)
        return common.loss_and_correct(model, {'params': moved, 'batch_stats': stats}, xb, yb, mask)

    chunk = mesh.size * points_per_device
    in_axes = (0,) + (None,) * 7
    one_cpu = mesh.size == 1 and mesh.devices.flat[0].platform == 'cpu'
    stacked = cpu_conv.looped(at_point, chunk, in_axes) if one_cpu else jax.vmap(at_point, in_axes=in_axes)
    fn = jax.jit(stacked, in_shardings=(points,) + (replicated,) * 7, out_shardings=points)
    fixed = jax.device_put((variables['params'], variables['batch_stats'], *directions), replicated)

    def evaluate(coords):
        padded = np.concatenate([coords, np.zeros((-len(coords) % chunk, 2))]).astype(np.float32)
        totals = np.zeros((len(padded), 2))
        for start in range(0, len(padded), chunk):
            ab = jax.device_put(padded[start:start + chunk], points)
            for xb, yb, mask in common.padded_batches(x, y, batch_size):
                loss, correct = fn(ab, *fixed, xb, yb, mask)
                totals[start:start + chunk] += np.stack(jax.device_get((loss, correct)), axis=-1)
        totals = totals[:len(coords)] / len(x)
        return totals[:, 0], totals[:, 1]
    return evaluate


def nonconvex_fraction(loss: np.ndarray) -> float:
    """Share of interior grid points where the finite-difference Hessian of the loss has a negative eigenvalue."""
    fxx = loss[2:, 1:-1] - 2 * loss[1:-1, 1:-1] + loss[:-2, 1:-1]
    fyy = loss[1:-1, 2:] - 2 * loss[1:-1, 1:-1] + loss[1:-1, :-2]
    fxy = (loss[2:, 2:] - loss[2:, :-2] - loss[:-2, 2:] + loss[:-2, :-2]) / 4
    smallest = (fxx + fyy) / 2 - np.sqrt(((fxx - fyy) / 2) ** 2 + fxy ** 2)
    return float(np.mean(smallest < 0))


def analyse(subjects, options: common.Options, out: str) -> list[str]:
    """Loss and accuracy of each subject on a line and a grid of filter-normalised directions, into `out`;
    the files written."""
    x, y = common.examples(subjects[0], options)
    axis = np.linspace(-options.span, options.span, options.grid)
    line = np.stack([axis, np.zeros_like(axis)], axis=-1)
    grid = np.stack(np.meshgrid(axis, axis, indexing='ij'), axis=-1).reshape(-1, 2)  # row i: a = axis[i]
    results, rows = [], []
    for subject in subjects:
        params = subject.variables['params']
        keys = jax.random.split(jax.random.key(options.seed))
        directions = [jax.jit(filter_normalized_direction)(k, params) for k in keys]
        evaluate = point_evaluator(subject.model, subject.variables, directions, x, y, options.batch_size,
                                   subject.run.mesh, options.points_per_device)
        line_loss, line_acc = evaluate(line)
        grid_loss, grid_acc = evaluate(grid)
        shape = (options.grid, options.grid)
        centre = options.grid // 2
        results.append({'label': subject.label, 'kind': subject.kind, 'step': subject.step,
                        'line': {'loss': line_loss.tolist(), 'accuracy': line_acc.tolist()},
                        'grid': {'loss': grid_loss.reshape(shape).tolist(), 'accuracy': grid_acc.reshape(shape).tolist()},
                        'centre': {'loss': float(grid_loss.reshape(shape)[centre, centre]),
                                   'accuracy': float(grid_acc.reshape(shape)[centre, centre])},
                        'nonconvex_fraction': nonconvex_fraction(grid_loss.reshape(shape))})
        rows += [{'label': subject.label, 'kind': subject.kind, 'a': a, 'b': b, 'loss': l, 'accuracy': acc}
                 for (a, b), l, acc in zip(grid.tolist(), grid_loss.tolist(), grid_acc.tolist())]
    content = {'examples': len(x), 'split': options.split, 'axis': axis.tolist(), 'seed': options.seed,
               'bn': 'eval mode, trained running statistics', 'subjects': results}
    lines = [f'{len(x)} examples of the {options.split} split, no augmentation, BatchNorm with the trained '
             f'statistics; {options.grid}x{options.grid} grid over [-{options.span}, {options.span}]^2 of two '
             f'filter-normalised directions (seed {options.seed}).', '',
             '| subject | loss at the weights | error % | loss at the grid corners (mean) | non-convex points |',
             '|---|---|---|---|---|']
    for r in results:
        g = np.asarray(r['grid']['loss'])
        corners = np.mean([g[0, 0], g[0, -1], g[-1, 0], g[-1, -1]])
        lines.append(f"| {r['label']} ({r['kind']}) | {r['centre']['loss']:.4f} | "
                     f"{100 * (1 - r['centre']['accuracy']):.2f} | {corners:.3f} | {100 * r['nonconvex_fraction']:.0f}% |")
    lines.append('\nNon-convex points: interior grid points where the finite-difference Hessian has a negative '
                 'eigenvalue.')
    return common.write_results(out, 'landscape', content, rows, plot(results, axis, out), 'Loss landscape', lines)


def plot(results, axis, out: str) -> list[str]:
    """The 1-D loss and error curves, and the 2-D contour and surface of each subject; the files written."""
    fig, axes = common.figure(1, 2)
    for r in results:
        colour = common.COLOURS[r['kind']]
        axes[0, 0].plot(axis, r['line']['loss'], color=colour, label=f"{r['label']} ({r['kind']})")
        axes[0, 1].plot(axis, [100 * (1 - a) for a in r['line']['accuracy']], color=colour, label=r['label'])
    axes[0, 0].set(xlabel='a (along d1)', ylabel='loss', yscale='log', title='loss on a line')
    axes[0, 1].set(xlabel='a (along d1)', ylabel='error (%)', title='error on a line')
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize='x-small')
    files = [common.save_figure(fig, out, 'landscape_1d.png')]

    losses = [np.minimum(np.asarray(r['grid']['loss']), SURFACE_CAP) for r in results]
    levels = np.geomspace(min(l.min() for l in losses), SURFACE_CAP, 16)
    a, b = np.meshgrid(axis, axis, indexing='ij')
    fig, axes = common.figure(1, len(results), width=4.8)
    for ax, r, loss in zip(axes[0], results, losses):
        contours = ax.contour(a, b, loss, levels=levels, cmap='viridis')
        ax.clabel(contours, levels[::3], fontsize=7, fmt='%.2g')
        ax.set(xlabel='a (d1)', ylabel='b (d2)', title=f"{r['label']} ({r['kind']})", aspect='equal')
    files.append(common.save_figure(fig, out, 'landscape_contour.png'))

    fig, axes = common.figure(1, len(results), width=4.8, projection='3d')
    for ax, r, loss in zip(axes[0], results, losses):
        ax.plot_surface(a, b, loss, cmap='viridis', vmin=levels[0], vmax=SURFACE_CAP, linewidth=0)
        ax.set(xlabel='a', ylabel='b', zlabel='loss', zlim=(0, SURFACE_CAP), title=f"{r['label']} ({r['kind']})")
    files.append(common.save_figure(fig, out, 'landscape_surface.png'))
    return files
