"""Metric output of a training run: a JSONL log, TensorBoard scalars, progress lines and a plot.

`<workdir>/metrics.jsonl` is the record of truth: one JSON object per `MetricWriter.write`,
appended so a resumed run continues the same file, and readable without TensorFlow or
TensorBoard. The TensorBoard event files under `<workdir>/tensorboard/` are for browsing only.

    with MetricWriter(workdir, enabled=jax.process_index() == 0) as writer:
        writer.write(step, {'train/loss': loss, 'train/top1': top1})
    plot_curves(workdir)   # -> <workdir>/train_curves.png
"""

from __future__ import annotations

import datetime
import math
import os
import time
from collections.abc import Callable, Mapping

import numpy as np

from resnet_jax.workdir import (
    CURVES_FILE,
    METRICS_FILE,
    TENSORBOARD_DIR,
    append_line,
    read_jsonl,
)


def _to_python(key: str, value) -> int | float | None:
    """A Python int or float for a Python, NumPy or JAX scalar; None for NaN and +-inf.

    JSON has no NaN or Infinity, and json.dumps would write them as bare tokens that strict
    readers reject, so a non-finite value (a diverged loss) is written as null instead.
    """
    array = np.asarray(value)
    if array.ndim != 0:
        raise ValueError(f'metric {key!r} must be a scalar, got shape {array.shape}')
    if array.dtype.kind in 'biu':
        return int(array)
    if array.dtype.kind == 'f':
        number = float(array)
        return number if math.isfinite(number) else None
    raise TypeError(f'metric {key!r} must be a number, got dtype {array.dtype}')


class MetricWriter:
    """Appends metrics to `<workdir>/metrics.jsonl` and to TensorBoard under `<workdir>/tensorboard/`.

    With `enabled=False` (every process but the first in a multi-host run) every method does
    nothing and no file or directory is created, so callers need no `if` of their own.
    Each JSONL line is flushed as it is written, so a killed job loses no written step;
    TensorBoard events are buffered until `flush()` or `close()` (or tensorboardX's own timer).
    """

    def __init__(self, workdir: str | os.PathLike, enabled: bool = True):
        self.enabled = enabled
        self._jsonl = None
        self._tensorboard = None
        if not enabled:
            return
        # Imported here so that importing this module stays cheap (tensorboardX pulls in protobuf).
        from tensorboardX import SummaryWriter

        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, METRICS_FILE), 'ab', buffering=0)  # one write() per line
        self._tensorboard = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR))

    def write(self, step: int, metrics: Mapping[str, object]) -> None:
        """Record `metrics` at `step`: one JSONL line `{"step": step, **metrics}` and one scalar per key."""
        if not self.enabled:
            return
        if 'step' in metrics:
            raise ValueError("'step' is reserved for the step number; rename that metric")
        step = _to_python('step', step)
        if not isinstance(step, int):
            raise TypeError(f'step must be an integer, got {step!r}')
        values = {key: _to_python(key, value) for key, value in metrics.items()}
        append_line(self._jsonl, {'step': step, **values})
        for key, value in values.items():
            self._tensorboard.add_scalar(key, math.nan if value is None else value, global_step=step)

    def flush(self) -> None:
        """Push buffered TensorBoard events to disk (the JSONL file is never behind)."""
        if self.enabled:
            self._jsonl.flush()
            self._tensorboard.flush()

    def close(self) -> None:
        """Flush and close both outputs; calling it again does nothing."""
        if self.enabled and not self._jsonl.closed:
            self._jsonl.close()
            self._tensorboard.close()

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def means(totals: Mapping[str, object], prefix: str) -> dict[str, float]:
    """'<prefix>/<name>' means from evaluation sums (`step.eval_sums`, on the host): each sum over the
    count, divided once after every batch and process has been added."""
    count = float(totals['count'])
    return {f'{prefix}/{k}': float(v) / count for k, v in totals.items() if k != 'count'}


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    """Every record of `<workdir>/metrics.jsonl` in file order (null for values that were non-finite).

    A resumed run may have written some steps twice; both records are returned. A line that is not
    a record (half-written by a killed run, or damaged) is skipped with a warning naming it.
    """
    return read_jsonl(os.path.join(workdir, METRICS_FILE))


class ProgressLogger:
    """Rate-limited one-line progress reports for the terminal.

    `maybe_log` prints at most once every `interval_seconds`, and always at the last step,
    so it can be called every step. The metric values are only converted when a line is
    printed, so device arrays are not fetched (and the host not blocked) on the other steps.
    """

    def __init__(self, total_steps: int, interval_seconds: float = 5.0,
                 print_fn: Callable[[str], object] = print,
                 clock: Callable[[], float] = time.monotonic):
        self.total_steps = total_steps
        self.interval_seconds = interval_seconds
        self.print_fn = print_fn
        self.clock = clock
        self._last = None  # (step, time) of the last printed line

    def maybe_log(self, step: int, metrics: Mapping[str, object]) -> bool:
        """Print a progress line if `interval_seconds` have passed or `step` is the last; True if printed."""
        now = self.clock()
        due = self._last is None or now - self._last[1] >= self.interval_seconds
        if not (due or step >= self.total_steps):
            return False
        self.print_fn(self._format_line(step, metrics, now))
        self._last = (step, now)
        return True

    def _format_line(self, step: int, metrics: Mapping[str, object], now: float) -> str:
        """`step 1200/64000 (1.9%) | loss 0.8123 | top1 71.3% | 2,345 img/s | eta 0:41:10`, from what is known."""
        parts = [f'step {step}/{self.total_steps} ({step / self.total_steps:.1%})']
        if 'train/loss' in metrics:
            parts.append(f"loss {float(metrics['train/loss']):.4f}")
        if 'train/top1' in metrics:
            parts.append(f"top1 {float(metrics['train/top1']):.1%}")
        if 'train/images_per_sec' in metrics:
            parts.append(f"{float(metrics['train/images_per_sec']):,.0f} img/s")
        if self._last is not None:
            # The rate since the previous line, not since the start, so compilation and
            # evaluation pauses long past do not skew the estimate.
            last_step, last_time = self._last
            if step > last_step and now > last_time:
                steps_per_second = (step - last_step) / (now - last_time)
                seconds_left = max(self.total_steps - step, 0) / steps_per_second
                parts.append(f'eta {datetime.timedelta(seconds=round(seconds_left))}')
        return ' | '.join(parts)


def plot_curves(workdir: str | os.PathLike, path: str | os.PathLike | None = None) -> str:
    """Plot loss and top-1/top-5 error against step from `<workdir>/metrics.jsonl`; return the PNG path.

    Writes `<workdir>/train_curves.png` unless `path` is given. Series that were never logged
    (a run without evaluation) are left out. When a resumed run logged a step twice, the
    later record wins, and null (non-finite) values show as gaps.
    """
    # A bare Figure with an Agg canvas renders without touching pyplot's global backend,
    # so calling this from an interactive session does not change how that session draws.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series: dict[str, dict[int, float]] = {}
    for record in read_metrics(workdir):
        for key, value in record.items():
            if key != 'step':
                series.setdefault(key, {})[record['step']] = math.nan if value is None else value

    figure = Figure(figsize=(12, 4.5), layout='constrained')
    FigureCanvasAgg(figure)
    loss_axes, error_axes = figure.subplots(1, 2)
    panels = [
        (loss_axes, 'loss', [('train/loss', 'train'), ('eval/loss', 'eval')], lambda v: v),
        (error_axes, 'error (%)', [('train/top1', 'train top-1'), ('eval/top1', 'eval top-1'),
                                   ('eval/top5', 'eval top-5')], lambda accuracy: 100 * (1 - accuracy)),
    ]
    for axes, ylabel, curves, transform in panels:
        for key, label in curves:
            if key in series:
                steps = sorted(series[key])
                # Markers on the sparse eval series keep a run with a single evaluation visible.
                marker = 'o' if key.startswith('eval/') else None
                values = [transform(series[key][s]) for s in steps]
                axes.plot(steps, values, label=label, marker=marker, markersize=3)
        axes.set_xlabel('step')
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        if axes.lines:
            axes.legend()

    path = os.fspath(path if path is not None else os.path.join(workdir, CURVES_FILE))
    figure.savefig(path, dpi=100)
    return path
