"""The training core: sharding equivalence, exact evaluation, determinism, the quickstart CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import EIGHT_CPU_DEVICES, tiny_config

from resnet_jax import checkpoint, sharding
from resnet_jax.data import arrays
from resnet_jax.train import metrics as metrics_lib
from resnet_jax.train.loop import train_and_evaluate
from resnet_jax.train.run import Run
from resnet_jax.train.step import topk_correct

ROOT = Path(__file__).parents[1]


def run_module(args, cwd=ROOT, env=None, timeout=600):
    env = dict(os.environ, **(env or {}))
    env['PYTHONPATH'] = str(ROOT) + os.pathsep + env.get('PYTHONPATH', '')
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_data_parallel_and_fsdp_match_one_device():
    """4 SGD steps on 8 CPU devices (8x1 data parallel, 2x4 FSDP) against 1 device, same global
    batch: the only difference is float32 summation order across shards, so 1e-5 absolute
    on parameters and BatchNorm statistics of order 0.1 to 1 is a tight bound."""
    result = run_module(['sharded_training.py'], cwd=ROOT / 'tests',
                        env={'XLA_FLAGS': EIGHT_CPU_DEVICES})
    assert result.returncode == 0, result.stderr[-3000:]
    diffs = json.loads(result.stdout.strip().splitlines()[-1])
    assert diffs['data_parallel'] < 1e-5 and diffs['fsdp'] < 1e-5, diffs
    assert diffs['moved'] > 1e-2, 'training did not change the parameters, so the comparison is vacuous'
    assert diffs['fsdp_spec'] == "P(None, None, None, 'fsdp')" and diffs['dp_spec'] == 'P()'


@pytest.mark.slow
def test_evaluation_covers_every_example_of_a_ragged_split():
    run = Run(tiny_config())
    assert len(run.eval_data) % run.config.eval.batch_size != 0  # 103 examples, batches of 24
    state = run.initial_state()
    metrics = run.evaluate(state)
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    correct, losses = [], []
    for image, label in zip(run.eval_data.images, run.eval_data.labels):  # one example at a time
        x = (image[None].astype(np.float32) / 255.0 - np.asarray(run.mean)) / np.asarray(run.std)
        logits = run.model.apply(variables, jnp.asarray(x, jnp.float32), train=False)
        correct.append(float(topk_correct(logits, jnp.asarray([label]), 1)[0]))
        losses.append(float(-jax.nn.log_softmax(logits)[0, label]))
    assert metrics['eval/top1'] == pytest.approx(np.mean(correct), abs=1e-7)
    assert metrics['eval/loss'] == pytest.approx(np.mean(losses), rel=1e-5)


def test_batch_order_is_a_function_of_seed_and_step_and_processes_split_it():
    one_epoch = np.concatenate([arrays.train_indices(100, 20, seed=3, step=s) for s in range(5)])
    assert sorted(one_epoch) == list(range(100))  # each epoch is a permutation
    np.testing.assert_array_equal(arrays.train_indices(100, 20, 3, 7), arrays.train_indices(100, 20, 3, 7))
    assert not np.array_equal(arrays.train_indices(100, 20, 3, 7), arrays.train_indices(100, 20, 4, 7))
    ds = arrays.ArrayDataset(np.arange(100, dtype=np.uint8).reshape(100, 1, 1, 1).repeat(3, -1),
                             np.arange(100, dtype=np.int32), 100)
    whole = next(arrays.train_batches(ds, 20, seed=3, start_step=6))['label']
    parts = [next(arrays.train_batches(ds, 20, 3, 6, process_index=p, process_count=4))['label'] for p in range(4)]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    np.testing.assert_array_equal(whole, arrays.train_indices(100, 20, 3, 6))


def final_params(config, workdir):
    manager = checkpoint.Manager(os.path.join(workdir, 'checkpoints'), config, read_only=True)
    state = manager.restore(Run(config).abstract_state).state
    manager.close()
    return jax.device_get({'params': state.params, 'batch_stats': state.batch_stats})


@pytest.mark.slow
def test_training_is_deterministic_in_the_seed(tmp_path):
    runs = []
    for i, seed in enumerate((0, 0, 1)):
        train_and_evaluate(tiny_config(seed=seed), str(tmp_path / f'run{i}'))
        runs.append(jax.tree_util.tree_leaves(final_params(tiny_config(seed=seed), str(tmp_path / f'run{i}'))))
    for a, b in zip(runs[0], runs[1]):
        np.testing.assert_array_equal(a, b)  # bit-identical
    assert any(not np.array_equal(a, b) for a, b in zip(runs[0], runs[2]))


@pytest.mark.slow
def test_ema_and_bfloat16_training(tmp_path):
    final = train_and_evaluate(tiny_config(**{'optim.ema_decay': 0.9, 'model.dtype': 'bfloat16'}), str(tmp_path))
    assert {'ema_eval/top1', 'ema_eval/loss', 'eval/top1'} <= set(final)
    assert np.isfinite(final['train/loss'])
    records = metrics_lib.read_metrics(str(tmp_path))
    assert records[0]['perf/compile_seconds'] > 0 and records[0]['perf/flops_per_step_per_device'] > 0


@pytest.mark.slow
def test_quickstart_command_from_the_readme(tmp_path):
    readme = (ROOT / 'README.md').read_text()
    command = 'python -m resnet_jax.train --config=experiments/quickstart.py --workdir=/tmp/quickstart'
    assert command in readme
    workdir = tmp_path / 'quickstart'
    result = run_module(command.replace('/tmp/quickstart', str(workdir)).split()[1:])
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'step 600/600' in result.stdout and 'img/s' in result.stdout
    records = metrics_lib.read_metrics(str(workdir))
    final_eval = [r for r in records if 'eval/top1' in r][-1]
    assert final_eval['step'] == 600
    assert final_eval['eval/top1'] > 0.9  # chance is 0.1
    for name in ('config.json', 'train_curves.png', 'tensorboard', 'checkpoints/600'):
        assert (workdir / name).exists(), name
    assert any(r.get('train/images_per_sec', 0) > 0 for r in records)

    evaluated = run_module(['-m', 'resnet_jax.evaluate', f'--workdir={workdir}'])
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads(evaluated.stdout)['evaluate/top1'] == pytest.approx(final_eval['eval/top1'], abs=1e-6)


def test_global_batch_assembles_process_local_data():
    mesh = sharding.make_mesh(tiny_config(**{'mesh.data': 1}), jax.devices()[:1])
    batch = sharding.global_batch({'image': np.zeros((4, 2, 2, 3), np.uint8), 'label': np.arange(4)}, mesh)
    assert batch['image'].shape == (4, 2, 2, 3)
    np.testing.assert_array_equal(batch['label'], np.arange(4))


@pytest.mark.slow
def test_ema_follows_its_recursion():
    run = Run(tiny_config(**{'optim.ema_decay': 0.5}))
    state = run.initial_state()
    batches = arrays.train_batches(run.train_data, run.config.batch_size, run.config.seed)
    history = [jax.device_get(state.params)]
    for _ in range(2):
        state, _ = run.train_step(state, sharding.global_batch(next(batches), run.mesh), jax.random.key(0))
        history.append(jax.device_get(state.params))
    expected = jax.tree_util.tree_map(lambda p0, p1, p2: 0.25 * p0 + 0.25 * p1 + 0.5 * p2, *history)
    for got, want in zip(jax.tree_util.tree_leaves(jax.device_get(state.ema_params)), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
