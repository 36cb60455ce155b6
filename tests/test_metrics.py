"""The metric log (JSONL and TensorBoard), the progress lines and the curve plot."""

import glob
import json
import math
import os
import struct
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax.train.metrics import (
    MetricWriter,
    ProgressLogger,
    plot_curves,
    read_metrics,
)


def read_events(directory):
    """Every (tag, step) -> value in the event files under `directory`, decoded by hand from the
    TFRecord framing (length, length CRC, payload, payload CRC) so no TensorBoard install is needed."""
    from tensorboardX.proto.event_pb2 import Event

    scalars = {}
    for path in glob.glob(os.path.join(directory, 'events.out.tfevents.*')):
        with open(path, 'rb') as file:
            data = file.read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack_from('<Q', data, offset)
            event = Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars[value.tag, event.step] = value.simple_value
    return scalars


def test_jsonl_round_trip_converts_numpy_and_jax_scalars_and_writes_nan_as_null(tmp_path):
    with MetricWriter(tmp_path) as writer:
        writer.write(np.int64(10), {'train/loss': np.float32(1.25), 'train/top1': jnp.float32(0.5),
                                    'train/images': jnp.array(7), 'train/lr': 0.1, 'count': np.int32(3)})
        writer.write(20, {'train/loss': float('nan'), 'eval/top5': jnp.array(float('inf'))})
    text = (tmp_path / 'metrics.jsonl').read_text()
    assert 'NaN' not in text and 'Infinity' not in text
    records = [json.loads(line) for line in text.splitlines()]  # strict JSON, line by line
    assert records == read_metrics(tmp_path) == [
        {'step': 10, 'train/loss': 1.25, 'train/top1': 0.5, 'train/images': 7, 'train/lr': 0.1, 'count': 3},
        {'step': 20, 'train/loss': None, 'eval/top5': None},
    ]
    assert [type(v) for v in records[0].values()] == [int, float, float, int, float, int]


def test_rejects_non_scalars_and_a_metric_named_step(tmp_path):
    with MetricWriter(tmp_path) as writer:
        with pytest.raises(ValueError, match="metric 'train/loss' must be a scalar"):
            writer.write(1, {'train/loss': np.ones(2)})
        with pytest.raises(ValueError, match="'step' is reserved"):
            writer.write(1, {'step': 3})
        with pytest.raises(TypeError, match='step must be an integer'):
            writer.write(1.5, {'train/loss': 1.0})
    assert read_metrics(tmp_path) == []


def test_a_resumed_run_appends_to_the_same_file(tmp_path):
    with MetricWriter(tmp_path) as writer:
        writer.write(1, {'train/loss': 2.0})
        writer.write(2, {'train/loss': 1.5})
    with MetricWriter(tmp_path) as writer:
        writer.write(3, {'train/loss': 1.0})
    assert [r['step'] for r in read_metrics(tmp_path)] == [1, 2, 3]


def test_each_line_is_on_disk_before_flush_or_close(tmp_path):
    writer = MetricWriter(tmp_path)
    writer.write(1, {'train/loss': 2.0})
    assert read_metrics(tmp_path) == [{'step': 1, 'train/loss': 2.0}]
    writer.close()
    writer.close()


def test_disabled_writer_creates_nothing(tmp_path):
    workdir = tmp_path / 'run'
    with MetricWriter(workdir, enabled=False) as writer:
        writer.write(1, {'train/loss': 1.0})
        writer.flush()
    assert not workdir.exists()


def test_tensorboard_events_hold_every_scalar(tmp_path):
    with MetricWriter(tmp_path) as writer:
        writer.write(100, {'train/loss': 1.5, 'train/top1': np.float32(0.25)})
        writer.write(200, {'eval/top1': 0.75, 'eval/loss': float('nan')})
    assert glob.glob(str(tmp_path / 'tensorboard' / 'events.out.tfevents.*'))
    scalars = read_events(tmp_path / 'tensorboard')
    assert set(scalars) == {('train/loss', 100), ('train/top1', 100), ('eval/top1', 200), ('eval/loss', 200)}
    assert scalars['train/loss', 100] == 1.5 and scalars['train/top1', 100] == 0.25
    assert scalars['eval/top1', 200] == 0.75 and math.isnan(scalars['eval/loss', 200])


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_progress_lines_are_rate_limited_and_carry_an_eta():
    clock, lines = FakeClock(), []
    progress = ProgressLogger(64000, interval_seconds=5.0, print_fn=lines.append, clock=clock)
    metrics = {'train/loss': 0.81234, 'train/top1': jnp.float32(0.713), 'train/images_per_sec': 2345.4}

    assert progress.maybe_log(200, metrics)  # the first call always prints; no rate yet, so no ETA
    clock.now = 4.9
    assert not progress.maybe_log(298, metrics)
    clock.now = 50.0  # 1000 steps in 50 s since the last line: 20 steps/s, 62800 steps left
    assert progress.maybe_log(1200, metrics)
    assert lines == ['step 200/64000 (0.3%) | loss 0.8123 | top1 71.3% | 2,345 img/s',
                     'step 1200/64000 (1.9%) | loss 0.8123 | top1 71.3% | 2,345 img/s | eta 0:52:20']


def test_progress_omits_missing_metrics_and_always_prints_the_last_step():
    clock, lines = FakeClock(), []
    progress = ProgressLogger(100, interval_seconds=5.0, print_fn=lines.append, clock=clock)
    assert progress.maybe_log(90, {})
    clock.now = 1.0
    assert not progress.maybe_log(99, {'eval/top1': 0.5})
    assert progress.maybe_log(100, {'train/loss': 0.5})
    assert lines == ['step 90/100 (90.0%)', 'step 100/100 (100.0%) | loss 0.5000 | eta 0:00:00']


def write_run(workdir, with_eval):
    with MetricWriter(workdir) as writer:
        for step in range(0, 500, 10):
            writer.write(step, {'train/loss': 2.0 / (1 + step / 100), 'train/top1': step / 600})
            if with_eval and step % 100 == 0:
                writer.write(step, {'eval/loss': 2.2 / (1 + step / 100), 'eval/top1': step / 700,
                                    'eval/top5': step / 550})
        writer.write(500, {'train/loss': float('nan')})


def assert_png(path):
    with open(path, 'rb') as file:
        data = file.read()
    assert data.startswith(b'\x89PNG\r\n\x1a\n') and len(data) > 10_000


@pytest.mark.parametrize('with_eval', [True, False])
def test_plot_curves_writes_a_png(tmp_path, with_eval):
    write_run(tmp_path, with_eval)
    path = plot_curves(tmp_path)
    assert path == str(tmp_path / 'train_curves.png')
    assert_png(path)


def test_plot_curves_to_a_chosen_path(tmp_path):
    write_run(tmp_path, with_eval=True)
    target = tmp_path / 'elsewhere.png'
    assert plot_curves(tmp_path, target) == str(target)
    assert_png(target)
    assert not (tmp_path / 'train_curves.png').exists()


def test_import_is_cheap_and_plotting_leaves_pyplot_alone(tmp_path):
    write_run(tmp_path, with_eval=False)
    script = (
        'import sys\n'
        'from resnet_jax.train.metrics import plot_curves\n'
        "assert 'tensorboardX' not in sys.modules and 'matplotlib' not in sys.modules\n"
        f'plot_curves({str(tmp_path)!r})\n'
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, '-c', script], check=True, cwd=repo_root)
