"""python -m resnet_jax.sweep.results <sweep_dir> [--metric=eval/top1,train/top1] [--dashed=REGEX]

Collects every run of a sweep (from `sweep.json` and each run's `metrics.jsonl`) into one
table: a row per configuration, the runs that differ only in `seed` averaged (mean ± sample
standard deviation), columns for the overrides that vary, the final value of each metric
(accuracies shown as error in %), the steps done and the runs' states. Nothing is selected on
the test split: where the runs held out validation examples (data.validation_split, logged as
'val/*'), a second column gives each 'eval/*' metric at the step where its 'val/*' twin was
best, labelled 'at best val/...'; without them there is no such column. Writes
`results.md`, `results.csv` and `curves.png` (training loss and the first metric against
step, a line per configuration, dashed where the label matches --dashed) into the sweep
directory and prints the Markdown.

`collect(sweep_dir)` returns the per-run records the table is built from, for other tools.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re

import numpy as np
from absl import app, flags

from resnet_jax import cli as cli_lib
from resnet_jax import sweep as sweep_lib
from resnet_jax.train import metrics as metrics_lib

RESULTS_MD, RESULTS_CSV, CURVES_PNG = 'results.md', 'results.csv', 'curves.png'
DEFAULT_DASHED = r'plain|skip=none'


def is_accuracy(metric: str) -> bool:
    """Whether `metric` is an accuracy (top1, top5), which the table shows as error %."""
    return metric.endswith(('top1', 'top5'))


def collect(sweep_dir: str) -> list[dict]:
    """One record per run of the sweep, in sweep order:

    name, workdir, overrides (as in get_sweep, 'arg' included), state ('finished' | 'unfinished' |
    'new'), step (the last training step logged, 0 before any), history {metric: [(step, value)]}
    (a step logged twice by a resumed run keeps its later value; non-finite values are left out),
    final {metric: last value}, selected {metric: its value at the step `selected` chooses on the
    held-out validation metric, where the run logged one} and selected_step {metric: that step}.
    """
    definition, runs = sweep_lib.load(sweep_dir)
    records = []
    for entry, run in zip(definition['entries'], runs):
        series: dict[str, dict[int, float]] = {}
        if os.path.exists(os.path.join(run.workdir, metrics_lib.METRICS_FILE)):
            for record in metrics_lib.read_metrics(run.workdir):
                for key, value in record.items():
                    if key != 'step' and value is not None:
                        series.setdefault(key, {})[record['step']] = value
        history = {key: sorted(values.items()) for key, values in series.items()}
        chosen = {key: selected(history, key) for key in history}
        records.append({
            'name': run.name, 'workdir': run.workdir, 'overrides': entry, 'state': sweep_lib.run_state(run.workdir),
            'step': max(series.get('train/loss', {0: None})), 'history': history,
            'final': {key: points[-1][1] for key, points in history.items()},
            'selected': {key: c[1] for key, c in chosen.items() if c},
            'selected_step': {key: c[0] for key, c in chosen.items() if c},
        })
    return records


def validation_metric(metric: str) -> str | None:
    """The held-out metric that selects where `metric` is read: 'val/top1' for 'eval/top1' and for itself,
    'ema_val/...' for 'ema_eval/...'; None for the rest (training metrics)."""
    prefix, _, name = metric.partition('/')
    held_out = {'eval': 'val', 'val': 'val', 'ema_eval': 'ema_val', 'ema_val': 'ema_val'}.get(prefix)
    return f'{held_out}/{name}' if held_out else None


def selected(history: dict, metric: str) -> tuple[int, float] | None:
    """(step, value of `metric` there) at the logged step where validation_metric(metric) was best (highest
    accuracy, lowest loss; the earliest of equals), or None where the run logged no such metric."""
    by = validation_metric(metric)
    values = dict(history.get(metric, ()))
    candidates = [(step, v) for step, v in history.get(by, ()) if step in values]
    if not candidates:
        return None
    sign = -1 if is_accuracy(by) else 1
    step = min(candidates, key=lambda c: (sign * c[1], c[0]))[0]
    return step, values[step]


def _display(metric: str, value: float) -> float:
    return 100.0 * (1.0 - value) if is_accuracy(metric) else value


def _column(metric: str, kind: str) -> str:
    if kind == 'selected':
        kind = f'at best {validation_metric(metric)}'
    return f'{metric} error % ({kind})' if is_accuracy(metric) else f'{metric} ({kind})'


def _columns(rows: list[dict], metrics: list[str]) -> list[tuple[str, str]]:
    """(metric, kind) of the table's value columns: 'final' for each metric, 'selected' where some run has it."""
    return [(m, kind) for m in metrics for kind in ('final', 'selected')
            if kind == 'final' or any(row['stats'][m, kind][2] for row in rows)]


def summarize(records: list[dict], metrics: list[str]) -> tuple[list[str], list[dict]]:
    """(the override keys that vary, one row per configuration): each row has 'label', 'values'
    {key: value}, 'runs', 'stats' {(metric, kind): (mean, std, n)}, 'steps', 'state', 'history'."""
    keys = list(dict.fromkeys(k for r in records for k in r['overrides'] if k != 'seed'))
    varying = [k for k in keys if len({sweep_lib.canonical(r['overrides'].get(k)) for r in records}) > 1]
    entries = [{k: r['overrides'][k] for k in varying if k in r['overrides']} for r in records]
    short = sweep_lib.short_keys(entries)
    groups: dict[str, list[dict]] = {}
    for entry, record in zip(entries, records):
        groups.setdefault(sweep_lib.entry_name(entry, short) if varying else 'all', []).append(record)
    rows = []
    for label, group in groups.items():
        stats = {}
        for metric in metrics:
            for kind in ('final', 'selected'):
                values = [_display(metric, r[kind][metric]) for r in group if metric in r[kind]]
                stats[metric, kind] = (float(np.mean(values)) if values else math.nan,
                                       float(np.std(values, ddof=1)) if len(values) > 1 else math.nan, len(values))
        steps = sorted({r['step'] for r in group})
        states = [s for s in sweep_lib.STATES if any(r['state'] == s for r in group)]
        rows.append({
            'label': label, 'values': {k: group[0]['overrides'].get(k) for k in varying}, 'runs': len(group),
            'stats': stats, 'steps': str(steps[0]) if len(steps) == 1 else f'{steps[0]}-{steps[-1]}',
            'state': states[0] if len(states) == 1 else ', '.join(
                f'{sum(r["state"] == s for r in group)} {s}' for s in states),
            'history': [r['history'] for r in group],
        })
    return varying, rows


def _override(value, absent: str) -> str:
    """An override's value as in run names; `absent` where the configuration leaves it at the default."""
    return absent if value is None else sweep_lib.name_value(value)


def _format(mean: float, std: float, n: int, digits: int) -> str:
    if n == 0:
        return '–'
    return f'{mean:.{digits}f}' + (f' ± {std:.{digits}f}' if n > 1 else '')


def markdown(varying: list[str], rows: list[dict], metrics: list[str]) -> str:
    """The table as Markdown: the varying overrides, runs, each metric column, steps and state."""
    header = [('config' if k == sweep_lib.ARG else k) for k in varying] or ['configuration']
    columns = _columns(rows, metrics)
    header += ['runs'] + [_column(m, kind) for m, kind in columns] + ['steps', 'state']
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for row in rows:
        cells = [_override(row['values'][k], '–') for k in varying] or [row['label']]
        cells.append(str(row['runs']))
        for metric, kind in columns:
            cells.append(_format(*row['stats'][metric, kind], 2 if is_accuracy(metric) else 4))
        cells += [row['steps'], row['state']]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def to_csv(varying: list[str], rows: list[dict], metrics: list[str]) -> str:
    """The table as CSV, each metric column as mean and std, for plotting or spreadsheets."""
    out = io.StringIO()
    writer = csv.writer(out)
    columns = _columns(rows, metrics)
    writer.writerow([*(varying or ['configuration']), 'runs',
                     *(f'{_column(m, kind)} {s}' for m, kind in columns for s in ('mean', 'std')),
                     'steps', 'state'])
    for row in rows:
        stats = [v for m, kind in columns for v in row['stats'][m, kind][:2]]
        writer.writerow([*([_override(row['values'][k], '') for k in varying] or [row['label']]), row['runs'],
                         *('' if math.isnan(v) else f'{v:.6g}' for v in stats), row['steps'], row['state']])
    return out.getvalue()


def _mean_curve(histories: list[dict], metric: str) -> tuple[list[int], list[float]]:
    """The metric at the steps every run of a configuration logged, averaged over those runs."""
    series = [dict(h[metric]) for h in histories if metric in h]
    if not series:
        return [], []
    steps = sorted(set.intersection(*(set(s) for s in series)))
    return steps, [float(np.mean([_display(metric, s[step]) for s in series])) for step in steps]


def plot(rows: list[dict], metrics: list[str], path: str, dashed: str = DEFAULT_DASHED) -> str:
    """Training loss and the first metric against step: a line per configuration (mean over its
    seeds), dashed where the configuration's label matches the regular expression `dashed`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 4.5), layout='constrained')
    FigureCanvasAgg(figure)
    panels = zip(figure.subplots(1, 2), ['train/loss', metrics[0]])
    colours = [f'C{i % 10}' for i in range(len(rows))]
    pattern = re.compile(dashed) if dashed else None
    for axes, metric in panels:
        for row, colour in zip(rows, colours):
            steps, values = _mean_curve(row['history'], metric)
            if steps:
                style = '--' if pattern and pattern.search(row['label']) else '-'
                axes.plot(steps, values, style, color=colour, label=row['label'])
        axes.set_xlabel('step')
        axes.set_ylabel(_column(metric, 'mean over seeds').replace(' (mean over seeds)', ''))
        axes.grid(alpha=0.3)
        if axes.lines:
            axes.legend(fontsize='small')
    figure.savefig(path, dpi=100)
    return path


def report(sweep_dir: str, metrics: list[str], dashed: str = DEFAULT_DASHED) -> str:
    """Write results.md, results.csv and curves.png into `sweep_dir`; return the Markdown."""
    if not metrics:
        raise ValueError('--metric: name at least one metrics.jsonl key, e.g. --metric=eval/top1')
    definition, _ = sweep_lib.load(sweep_dir)
    records = collect(sweep_dir)
    logged = set().union(*(r['history'] for r in records))
    missing = [m for m in metrics if m not in logged]
    if logged and missing:
        raise ValueError(f'--metric: no run logged {", ".join(missing)}; the runs logged: {", ".join(sorted(logged))}')
    varying, rows = summarize(records, metrics)
    text = (f'Sweep `{definition["config"]}`: {len(records)} runs, {len(rows)} configurations; '
            'mean ± sample standard deviation over the runs that differ only in seed. "final": at the last '
            'step; "at best val/...": at the step where the held-out validation metric was best '
            '(data.validation_split). Nothing is selected on the test split.\n\n'
            + markdown(varying, rows, metrics) + '\n')
    with open(os.path.join(sweep_dir, RESULTS_MD), 'w') as f:
        f.write(text)
    with open(os.path.join(sweep_dir, RESULTS_CSV), 'w', newline='') as f:
        f.write(to_csv(varying, rows, metrics))
    plot(rows, metrics, os.path.join(sweep_dir, CURVES_PNG), dashed)
    return text


def cli() -> None:
    """`python -m resnet_jax.sweep.results <sweep_dir>`: define its flags and run `report` under resnet_jax.cli."""
    flags.DEFINE_list('metric', ['eval/top1'], 'metrics.jsonl keys to tabulate (accuracies shown as error %)')
    flags.DEFINE_string('dashed', DEFAULT_DASHED, 'configurations whose label matches this regex are dashed in '
                        'curves.png (empty: none)')

    def main(argv):
        if len(argv) != 2:
            raise app.UsageError('usage: python -m resnet_jax.sweep.results <sweep_dir> [--metric=...] [--dashed=...]')
        re.compile(flags.FLAGS.dashed)
        print(report(argv[1], flags.FLAGS.metric, flags.FLAGS.dashed), end='')

    cli_lib.run(main, errors=(ValueError, re.error))


if __name__ == '__main__':
    cli()
