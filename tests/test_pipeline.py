"""The feeds: exact resume in a new process for every source, order independent of workers and
processes, complete evaluation, the throughput command, and end-to-end streamed training."""

import json
import re

import numpy as np
import pytest
from helpers import build_tfds_dataset, make_image_folder, tiny_config
from iterate_batches import take
from test_train import run_module

from resnet_jax.data import pipeline
from resnet_jax.train import config as config_lib


@pytest.fixture(scope='module')
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    return {'folder': make_image_folder(root / 'folder', {'train': 12, 'test': 5}),
            'tfds': build_tfds_dataset(root / 'tfds'), 'tfds_dir': root / 'tfds'}


def source_config(datasets, source: str, feed: str, **overrides):
    """tiny_config on 'shapes', the test-built folder or the test-built TFDS dataset, 16 px."""
    c = tiny_config(**{'data.feed': feed, 'data.image_size': 16, 'batch_size': 8, **overrides})
    if source == 'folder':
        c.data.dataset = f'folder:{datasets["folder"]}'
        c.data.augment = 'inception' if feed == 'stream' else 'cifar'
    elif source == 'tfds':
        c.data.dataset, c.data.tfds_data_dir = f'tfds:{datasets["tfds"]}', str(datasets['tfds_dir'])
    return c


@pytest.mark.parametrize('source,feed', [('shapes', 'host'), ('shapes', 'device'), ('folder', 'host'),
                                         ('folder', 'stream'), ('tfds', 'host'), ('tfds', 'stream')])
def test_a_restored_iterator_continues_exactly_in_a_new_process(datasets, tmp_path, source, feed):
    """K=5 batches, state saved, 6 more in a fresh process == batches 5..10 of one run. The 36-image
    folder and 40-record TFDS set make 8-image batches cross epoch boundaries on the way."""
    config = source_config(datasets, source, feed)
    uninterrupted, _ = take(config, 11)
    _, state = take(config, 5)
    assert state['step'] == 5 and json.loads(json.dumps(state)) == state  # small, and JSON as it is
    config_lib.write_resolved(config, str(tmp_path))
    (tmp_path / 'state.json').write_text(json.dumps(state))
    result = run_module(['tests/iterate_batches.py', str(tmp_path), '6'])
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = np.load(tmp_path / 'batches.npz')
    for i, expected in enumerate(uninterrupted[5:]):
        for key, value in expected.items():
            np.testing.assert_array_equal(resumed[f'{i}/{key}'], value, err_msg=f'batch {5 + i} {key}')
    assert json.loads((tmp_path / 'state.json').read_text())['step'] == 11
    # Control: the batches do change from step to step, so equality above means something.
    assert not np.array_equal(uninterrupted[5]['image'], uninterrupted[6]['image'])


def test_a_state_from_another_data_order_is_refused(datasets):
    config = source_config(datasets, 'shapes', 'host')
    _, state = take(config, 2)
    other = pipeline.train_iterator(source_config(datasets, 'shapes', 'host', seed=1),
                                    pipeline.open_split(config, 'train'))
    with pytest.raises(ValueError, match=r"seed was 0, now 1"):
        other.set_state(state)


@pytest.mark.slow
def test_stream_order_does_not_depend_on_workers_or_processes(datasets):
    """Batches with 2 Grain worker processes equal those made in-process, and two processes'
    slices put side by side are the global batch (augmentation draws follow the global position)."""
    config = source_config(datasets, 'tfds', 'stream', **{'data.augment': 'cifar'})
    source = pipeline.open_split(config, 'train')
    one = pipeline.train_iterator(config, source, start_step=3, process_index=0, process_count=1)
    config.data.workers = 2
    workers = pipeline.train_iterator(config, source, start_step=3, process_index=0, process_count=1)
    halves = [pipeline.train_iterator(config, source, start_step=3, process_index=p, process_count=2)
              for p in range(2)]
    for _ in range(3):
        expected = next(one)
        np.testing.assert_array_equal(next(workers)['image'], expected['image'])
        parts = [next(h) for h in halves]
        for key in ('image', 'label'):
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), expected[key])


@pytest.mark.parametrize('feed', ['host', 'stream'])
def test_evaluation_reads_every_example_once(datasets, feed):
    """13 test records in global batches of 6 over 2 processes: 3 batches, 5 padding rows masked."""
    config = source_config(datasets, 'tfds', feed, **{'eval.batch_size': 6})
    source = pipeline.open_split(config, 'test')
    labels, masks = [], []
    for p in range(2):
        for batch in pipeline.eval_batches(config, source, p, 2):
            assert batch['image'].shape == (3, 16, 16, 3)
            labels.append(batch['label']), masks.append(batch['mask'])
    assert len(labels) == 6 and sum(m.sum() for m in masks) == 13
    expected = [source[i][1] for i in range(13)]
    by_position = [None] * 18
    for p in range(2):
        for b in range(3):
            for i in range(3):
                by_position[b * 6 + p * 3 + i] = (labels[p * 3 + b][i], masks[p * 3 + b][i])
    assert [int(label) for label, mask in by_position if mask] == expected


@pytest.mark.slow
def test_streamed_training_end_to_end(datasets, tmp_path):
    """The command line on the TFDS dataset: Grain worker processes, Inception crops, mixup and
    CutMix; the run finishes, evaluates every test record and logs a finite loss."""
    result = run_module(['-m', 'resnet_jax.train', '--config=experiments/quickstart.py', f'--workdir={tmp_path}',
                         f'--config.data.dataset=tfds:{datasets["tfds"]}',
                         f'--config.data.tfds_data_dir={datasets["tfds_dir"]}', '--config.data.feed=stream',
                         '--config.data.workers=2', '--config.data.augment=inception', '--config.data.image_size=16',
                         '--config.data.mixup_alpha=0.2', '--config.data.cutmix_alpha=1.0', '--config.batch_size=8',
                         '--config.eval.batch_size=8', '--config.num_steps=6', '--config.optim.warmup_steps=1',
                         '--config.log.every_steps=3', '--config.model.stage_sizes=(1,1,1)',
                         '--config.model.widths=(8,16,32)', '--config.model.stem_width=8'])
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    losses = [r['train/loss'] for r in records if 'train/loss' in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert any('eval/top1' in r for r in records)


def test_throughput_command_prints_a_row_per_feed():
    result = run_module(['-m', 'resnet_jax.bench.throughput', '--config=experiments/quickstart.py',
                         '--config.data.num_train=256', '--config.data.image_size=16', '--feeds=host,device,stream',
                         '--workers=0', '--batches=3', '--warmup=1'])
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout.split('| dataset |')[-1].strip().splitlines()[2:]
    assert [row.split('|')[2].strip() for row in table] == ['host', 'device', 'stream']
    for row in table:
        assert float(row.split('|')[8].replace(',', '')) > 0  # images per second
    bad = run_module(['-m', 'resnet_jax.bench.throughput', '--config=experiments/quickstart.py', '--feeds=gpu'])
    assert bad.returncode != 0 and re.search(r"--feeds: \['gpu'\] not among host, device, stream", bad.stderr)
