"""python -m resnet_jax.bench on the CPU: the table, the JSON, and the PyTorch comparison.

Timings on a shared 2-core machine mean nothing, so these tests check what must hold at any
speed: both frameworks start from the same weights and compute the same first loss, the
derived columns follow from the measured ones, every source runs, the
largest-batch search brackets the memory limit, and bad flags fail before any work.
"""

import json

import pytest
from test_train import run_module

from resnet_jax.bench import measure
from resnet_jax.models import get_model
from resnet_jax.models.summary import count_macs

TINY = ['--model=resnet20', '--image_size=16', '--dtype=float32', '--steps=2', '--window=1', '--warmup=1']


def bench(tmp_path, *flags):
    out = tmp_path / 'rows.json'
    result = run_module(['-m', 'resnet_jax.bench', *TINY, *flags, f'--json={out}'])
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, json.loads(out.read_text())


@pytest.mark.slow
def test_same_first_loss_as_pytorch_and_consistent_columns(tmp_path):
    stdout, (row, evaluated) = bench(tmp_path, '--batch_size=8', '--vs_torch', '--torch_compile=false',
                                     '--peak_tflops=1', '--step=train,eval')
    torch = row['torch_eager']
    # Same initial weights (torch's init, converted) and the same normalised batch: float32
    # losses agree to rounding (measured ~1e-7 relative); a wrong layout or BN mode is >1e-2 off.
    assert row['first_loss'] == pytest.approx(torch['first_loss'], rel=1e-5)
    assert torch['source'] == 'torch.nn reference'  # no torchvision on the CPU machines
    assert row['ratio_vs_torch_eager'] == pytest.approx(row['images_per_sec'] / torch['images_per_sec'])
    assert row['tflop_per_step_per_device'] * 1e12 == 6 * count_macs(get_model('resnet20'), 16) * 8
    seconds = row['step_ms_median'] / 1e3
    assert row['images_per_sec'] == pytest.approx(8 / seconds)
    assert row['mfu'] == pytest.approx(row['tflop_per_step_per_device'] / seconds)  # peak 1 TFLOP/s
    assert row['step_ms_p10'] <= row['step_ms_median'] <= row['step_ms_p90']
    assert row['projected_minutes'] == pytest.approx(64_000 * seconds / 60)
    assert 0 < row['memory_gib'] < 1 and row['compile_seconds'] > 0
    # The evaluation step: eval-mode BatchNorm (initial running statistics) on the same batch, both sides.
    assert evaluated['step'] == 'eval' and evaluated['projected_minutes'] is None
    assert evaluated['first_loss'] == pytest.approx(evaluated['torch_eager']['first_loss'], rel=1e-5)
    assert abs(evaluated['first_loss'] - row['first_loss']) > 1e-3  # batch statistics vs running ones
    assert evaluated['tflop_per_step_per_device'] * 1e12 == 2 * count_macs(get_model('resnet20'), 16) * 8
    lines = stdout.strip().splitlines()
    assert lines[-4].startswith('| model | batch | dtype | source | step |')
    assert lines[-2].startswith('| resnet20 | 8 | float32 | synthetic | train |')
    assert lines[-1].startswith('| resnet20 | 8 | float32 | synthetic | eval |')


def test_repeated_rows_alternate_the_frameworks_and_pair_their_ratios(monkeypatch):
    """--repeat=3: ours and PyTorch's measurements alternate, each ratio pairs the two runs made one
    after the other, and the row keeps the median runs and the median ratio (fake timings)."""
    ours, theirs, calls = iter([100.0, 50.0, 80.0]), iter([100.0, 40.0, 100.0]), []

    def fresh(fn, *args):
        calls.append(fn.__name__)
        if fn is measure._torch_weights:
            return None
        speed = next(ours if fn is measure.measure_jax else theirs)
        return {'images_per_sec': speed, 'step_ms_median': 1e3 / speed}

    monkeypatch.setattr(measure, '_in_fresh_process', fresh)
    spec = {'model': 'resnet20', 'batch': 8, 'dtype': 'float32', 'source': 'synthetic', 'step': 'train',
            'remat': False}
    args = {'image_size': 16, 'num_examples': 8, 'dataset': 'synthetic', 'peak_tflops': None, 'max_batch': False,
            'vs_torch': True, 'torch_compile': False, 'repeat': 3, 'steps': 1, 'warmup': 1, 'window': 1,
            'projected_steps': 10}
    row = measure.measure_row(spec, args)
    assert calls == ['_torch_weights'] + ['measure_jax', '_torch_row'] * 3
    assert row['ratio_vs_torch_eager_all'] == [1.0, 1.25, 0.8] and row['ratio_vs_torch_eager'] == 1.0
    assert row['images_per_sec'] == 80.0 and row['torch_eager']['images_per_sec'] == 100.0
    assert row['images_per_sec_all'] == [100.0, 50.0, 80.0] and row['repeats'] == 3
    assert '| 1.00 (0.80-1.25) |' in measure.table([dict(row, device_kind='cpu', num_devices=1,
                                                             images_per_sec_per_device=80.0, step_ms_p10=1.0,
                                                             step_ms_p90=2.0, compile_seconds=1.0, mfu=None,
                                                             memory_gib=None, first_loss=None)])


@pytest.mark.slow
def test_every_source(tmp_path):
    _, rows = bench(tmp_path, '--batch_size=16', '--source=synthetic,device,host', '--num_examples=64')
    assert [r['source'] for r in rows] == ['synthetic', 'device', 'host']
    assert len({r['first_loss'] for r in rows}) == 3  # each source draws its own first batch
    assert rows[1]['tflop_per_step_per_device'] == rows[0]['tflop_per_step_per_device']


@pytest.mark.slow
def test_largest_batch_brackets_the_memory_limit(tmp_path):
    stdout, (row,) = bench(tmp_path, '--max_batch', '--memory_limit_gib=0.15')
    assert row['max_batch'] > 0 and row['max_batch'] % 32 == 0
    assert row['memory_gib'] <= 0.15 < row['next_memory_gib']
    assert row['compiles'] <= 5 and row['images_per_sec'] > 0  # the batch found really ran
    assert '| largest batch |' in stdout


@pytest.mark.parametrize('flags, message', [
    (['--model=resnet51'], "--model: unknown model 'resnet51'"),
    (['--source=disk'], "--source: 'disk' is not one of synthetic, device, host"),
    (['--batch_size=8,x'], '--batch_size: 8,x must be comma-separated integers'),
    (['--step=predict'], "--step: 'predict' is not one of train, eval"),
    (['--repeat=0'], '--batch_size, --steps, --warmup, --window and --repeat must be positive'),
    (['--step=eval', '--source=host'], '--step=eval times the evaluation step on one fixed batch'),
    (['--vs_torch', '--source=device'], '--vs_torch measures the step alone: use --source=synthetic'),
    (['--json=/nonexistent/rows.json'], '--json=/nonexistent/rows.json: its directory does not exist'),
])
def test_bad_flags_fail_with_a_message(flags, message):
    result = run_module(['-m', 'resnet_jax.bench', *flags], timeout=120)
    assert result.returncode != 0 and f'error: {message}' in result.stderr
