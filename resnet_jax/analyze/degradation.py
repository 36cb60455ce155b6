"""degradation: He et al. 2016's Figure 6 from a sweep of plain and residual runs at several depths.

Reads the sweep through `resnet_jax.sweep.results.collect` and each run's recorded config. Two panels,
plain and residual, one colour per depth: thin dashed lines are the training error and bold lines
the test error against iterations. The training error is `train/top1` as the runs log it: the
running average over the logging window, on augmented batches, as He et al.'s curves are. Depth
counts the weight layers (convs on the main path and the classifier; shortcut projections are not
counted), which gives the papers' 20, 32, 44, 56 for the CIFAR nets.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import traverse_util

from resnet_jax import workdir as workdir_lib
from resnet_jax.analyze import common
from resnet_jax.sweep import results
from resnet_jax.train import config as config_lib

NOT_COUNTED = ('shortcut_conv', 'gate', 'se')  # kernels off the main path


def depth(model, image_size: int) -> int:
    """The weight layers of `model` on the main path (convs and the classifier): the papers' depth."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)))
    paths = traverse_util.flatten_dict(shapes['params'])
    return sum(1 for path in paths if path[-1] == 'kernel' and not any(p in NOT_COUNTED for p in path))


def runs(sweep_dir: str) -> list[dict]:
    """One entry per run that has started: name, kind, depth, and its train/test error histories (%)."""
    entries = []
    for record in results.collect(sweep_dir):
        if not os.path.exists(os.path.join(record['workdir'], workdir_lib.CONFIG_FILE)):
            continue  # not started yet
        config = config_lib.load_resolved(record['workdir'])
        model = common.model_of(config)
        error = lambda key: [(step, 100 * (1 - v)) for step, v in record['history'].get(key, [])]
        entries.append({'name': record['name'], 'workdir': record['workdir'], 'state': record['state'],
                        'kind': common.kind(model), 'depth': depth(model, config.data.image_size),
                        'train_error': error('train/top1'), 'test_error': error('eval/top1')})
    if not entries:
        raise ValueError(f'{sweep_dir}: none of its runs has started (no run directory holds a config.json)')
    return sorted(entries, key=lambda e: (e['kind'], e['depth'], e['name']))


def analyse(sweep_dir: str, out: str) -> list[str]:
    """Figure 6 of He et al. from the sweep's runs into `out`: JSON, CSV, the plot and summary.md; the
    files written."""
    entries = runs(sweep_dir)
    os.makedirs(out, exist_ok=True)
    rows = []
    for e in entries:
        final = lambda series: series[-1][1] if series else ''
        rows.append({'kind': e['kind'], 'depth': e['depth'], 'run': e['name'], 'state': e['state'],
                     'steps': e['train_error'][-1][0] if e['train_error'] else 0,
                     'train_error_final': final(e['train_error']), 'test_error_final': final(e['test_error'])})
    fmt = lambda v: f'{v:.2f}' if v != '' else '–'
    lines = ['Training error: the running train/top1 of the logging window, on augmented batches. Test error: at '
             'the last step (nothing is selected on the test split).', '',
             '| net | depth | run | steps | training error % | test error % |',
             '|---|---|---|---|---|---|']
    lines += [f"| {r['kind']} | {r['depth']} | {r['run']} | {r['steps']} | {fmt(r['train_error_final'])} | "
              f"{fmt(r['test_error_final'])} |" for r in rows]
    return common.write_results(out, 'degradation', {'sweep_dir': os.path.abspath(sweep_dir), 'runs': entries}, rows,
                                [plot(entries, out)], 'Degradation (He et al. 2016, Figure 6)', lines)


def plot(entries, out: str) -> str:
    """The two panels (plain, residual) of training and test error against iterations, a colour per depth."""
    depths = sorted({e['depth'] for e in entries})
    colours = {d: f'C{i % 10}' for i, d in enumerate(depths)}
    fig, axes = common.figure(1, 2, width=6.0, height=4.5)
    for ax, kind in zip(axes[0], ('plain', 'residual')):
        labelled = set()
        for e in (e for e in entries if e['kind'] == kind):
            colour, label = colours[e['depth']], None if e['depth'] in labelled else f"{kind}-{e['depth']}"
            labelled.add(e['depth'])
            if e['train_error']:
                ax.plot(*zip(*e['train_error']), '--', linewidth=0.8, color=colour)
            if e['test_error']:
                ax.plot(*zip(*e['test_error']), '-', linewidth=2.2, color=colour, label=label)
        ax.set(xlabel='iterations', ylabel='error (%)', title=f'{kind} nets (dashed: training, bold: test)')
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize='small')
    return common.save_figure(fig, out, 'degradation.png')
