"""Device-resident training data (data.feed='device'): batch order, epochs, sharding, resumption.

Most tests use an "id" dataset: every pixel of example i is i and its label is i % CLASSES,
so the example behind each row of a drawn batch can be read back, and a row whose label
was shuffled apart from its image is caught. The 8-device checks run this file as a script
in a subprocess, because the 8 CPU devices must be requested before JAX starts:
XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/test_device_data.py
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config

from resnet_jax import checkpoint, sharding
from resnet_jax.data import device as device_data
from resnet_jax.data.arrays import ArrayDataset
from resnet_jax.errors import ConfigError
from resnet_jax.train import config as config_lib
from resnet_jax.train import metrics as metrics_lib
from resnet_jax.train.loop import train_and_evaluate
from resnet_jax.train.run import Run

ROOT = Path(__file__).parents[1]
CLASSES = 5


def id_dataset(n: int, labels=None) -> ArrayDataset:
    """Example i: a 2x2 RGB image with every pixel i; label i % CLASSES unless `labels` says otherwise."""
    ids = np.arange(n)
    images = np.ascontiguousarray(np.broadcast_to(ids[:, None, None, None], (n, 2, 2, 3))).astype(np.uint8)
    labels = (ids % CLASSES) if labels is None else labels
    return ArrayDataset(images, np.asarray(labels, np.int32), CLASSES)


def ids_of(images, labels, label_of=None) -> np.ndarray:
    """The example ids of the rows of a batch, after checking each image is intact and keeps its label."""
    images, labels = np.asarray(images), np.asarray(labels)
    ids = images[:, 0, 0, 0].astype(np.int64)
    assert (images == images[:, :1, :1, :1]).all(), 'an image was mixed with another'
    expected = ids % CLASSES if label_of is None else np.asarray(label_of)[ids]
    np.testing.assert_array_equal(labels, expected, err_msg='a label is no longer paired with its image')
    return ids


def one_device_mesh():
    return sharding.make_mesh(tiny_config(**{'mesh.data': 1}), jax.devices()[:1])


def drawer(mesh, seed: int, batch_size: int):
    """batch_at under jit with the step traced, as the train step calls it."""
    return jax.jit(lambda data, step: device_data.batch_at(data, seed, step, batch_size, mesh))


def stream(data, mesh, seed: int, batch_size: int, steps: int, label_of=None) -> np.ndarray:
    """The ids of batches 0 .. steps-1, concatenated."""
    draw = drawer(mesh, seed, batch_size)
    batches = [draw(data, jnp.int32(t)) for t in range(steps)]
    return np.concatenate([ids_of(b['image'], b['label'], label_of) for b in batches])


def test_batch_is_a_pure_function_of_seed_and_step():
    mesh, ds = one_device_mesh(), id_dataset(12)
    data = device_data.put(ds, mesh, seed=0)
    draw = drawer(mesh, 0, 4)
    batches = [draw(data, jnp.int32(t)) for t in range(9)]
    # A second upload and a second trace give the same batch 5, bit for bit, and so does eager mode.
    again = drawer(mesh, 0, 4)(device_data.put(ds, mesh, seed=0), jnp.int32(5))
    eager = device_data.batch_at(data, 0, 5, 4, mesh)
    for other in (again, eager):
        np.testing.assert_array_equal(other['image'], batches[5]['image'])
        np.testing.assert_array_equal(other['label'], batches[5]['label'])
    # Different steps draw different batches (3 epochs of 12 in batches of 4)...
    ids = [tuple(ids_of(b['image'], b['label'])) for b in batches]
    assert len(set(ids)) == 9, ids
    # ...and the seed of either the upload or the draw changes the order.
    base = np.concatenate(ids)
    assert not np.array_equal(stream(data, mesh, 1, 4, 9), base)
    assert not np.array_equal(stream(device_data.put(ds, mesh, seed=1), mesh, 0, 4, 9), base)


def test_every_epoch_visits_each_example_once_whatever_the_batch_size():
    n, epochs, seed = 12, 3, 3
    mesh, ds = one_device_mesh(), id_dataset(n)
    data = device_data.put(ds, mesh, seed)
    assert data['image'].dtype == np.uint8 and data['image'].shape == (n, 2, 2, 3)  # kept as uint8
    assert data['label'].dtype == np.int32 and data['image'].sharding == sharding.batch_sharding(mesh)
    assert sorted(ids_of(data['image'], data['label'])) == list(range(n))  # one shard keeps everything
    streams = {}
    for batch in (4, 5, 7, 12):  # 5 and 7 straddle epoch boundaries; 12 is exactly one epoch
        steps = -(-epochs * n // batch)
        s = stream(data, mesh, seed, batch, steps)
        assert len(s) == steps * batch
        for e in range(len(s) // n):
            assert sorted(s[e * n:(e + 1) * n]) == list(range(n)), (batch, e, s)
        tail = s[len(s) // n * n:]  # the start of the next epoch: no repeats either
        assert len(set(tail)) == len(tail), (batch, s)
        streams[batch] = s[:epochs * n]
    # Example p of the stream is the same whatever the batch size: a straddling batch takes the
    # end of one epoch's permutation and the start of the next.
    for batch in (5, 7, 12):
        np.testing.assert_array_equal(streams[batch], streams[4], err_msg=f'batch {batch}')
    orders = {tuple(streams[4][e * n:(e + 1) * n]) for e in range(epochs)}
    assert len(orders) == epochs, 'an epoch repeated the order of another'


def test_labels_stay_paired_with_their_images():
    n = 40
    table = np.random.default_rng(7).integers(0, CLASSES, n)  # labels unrelated to the ids
    mesh, ds = one_device_mesh(), id_dataset(n, labels=table)
    data = device_data.put(ds, mesh, seed=11)
    held = ids_of(data['image'], data['label'], table)
    assert sorted(held) == list(range(n)) and not np.array_equal(held, np.arange(n))  # dealt in a shuffled order
    s = stream(data, mesh, 11, 6, 14, label_of=table)  # every row of 84 draws checked, over 3 epochs
    assert sorted(s[:n]) == list(range(n)) and sorted(s[n:2 * n]) == list(range(n))


# The 8-device checks: 53 examples, so each of the 8 shards holds 6 and 5 are never drawn;
# 4 examples per shard and step, so batches straddle the 6-example epochs of a shard.
SHARDED_N, SHARDED_SEED, LOCAL_BATCH, SHARDED_STEPS = 53, 5, 4, 5


def per_device(array_pair):
    """{device id: (shard position along the batch, ids)} for a global image array and its labels."""
    images, labels = array_pair
    rows = images.shape[0] // len(images.sharding.device_set)
    labels_on = {s.device.id: s.data for s in labels.addressable_shards}
    return {s.device.id: (s.index[0].start // rows, ids_of(s.data, labels_on[s.device.id]).tolist())
            for s in images.addressable_shards}


def sharded_draws() -> dict:
    """Run in the 8-device subprocess: what each device holds and draws, for data=8 and data=4 x fsdp=2."""
    devices = jax.devices()
    assert len(devices) == 8, f'needs 8 devices, got {len(devices)}'
    ds = id_dataset(SHARDED_N)
    out = {}
    for data_axis, fsdp in ((8, 1), (4, 2)):
        mesh = sharding.make_mesh(tiny_config(**{'mesh.data': data_axis, 'mesh.fsdp': fsdp}), devices)
        data = device_data.put(ds, mesh, SHARDED_SEED)
        draw = drawer(mesh, SHARDED_SEED, 8 * LOCAL_BATCH)
        batches = [draw(data, jnp.int32(t)) for t in range(SHARDED_STEPS)]
        out[f'{data_axis}x{fsdp}'] = {
            'held': per_device((data['image'], data['label'])),
            'drawn': [per_device((b['image'], b['label'])) for b in batches],
            'global': [ids_of(b['image'], b['label']).tolist() for b in batches]}
    errors = {}
    for name, call in (('put', lambda: device_data.put(id_dataset(7), mesh, 0)),
                       ('batch_at', lambda: drawer(mesh, 0, 8 * 7)(data, jnp.int32(0)))):
        try:
            call()
        except ValueError as e:
            errors[name] = str(e)
    out['errors'] = errors
    out['training'] = device_fed_training(devices)
    return out


def device_fed_training(devices) -> dict:
    """2 device-fed steps on data=4 x fsdp=2 against host-fed steps on 1 device given the same batches."""
    config = tiny_config(**{'data.feed': 'device', 'mesh.data': 4, 'mesh.fsdp': 2, 'mesh.fsdp_min_size': 1})
    config.mesh.param_rules = (('.*kernel', 'fsdp'),)
    run = Run(config, devices)
    state, rng = run.initial_state(), jax.random.key(config.seed)
    initial = jax.device_get(state.params)
    dataset = run.train_inputs(0)[1]()
    batches = [jax.device_get(device_data.batch_at(dataset, config.seed, t, config.batch_size, run.mesh))
               for t in range(2)]
    for _ in range(2):
        state, _ = run.train_step(state, dataset, rng)
    reference = Run(tiny_config(**{'mesh.data': 1}), devices[:1])
    ref_state = reference.initial_state()
    for batch in batches:
        ref_state, _ = reference.train_step(ref_state, sharding.global_batch(batch, reference.mesh), rng)

    def max_difference(a, b):
        return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))

    got = jax.device_get({'params': state.params, 'batch_stats': state.batch_stats})
    want = jax.device_get({'params': ref_state.params, 'batch_stats': ref_state.batch_stats})
    kernel = state.params['stage2_block0']['conv1']['kernel']
    return {'difference': max_difference(got, want), 'moved': max_difference(got['params'], initial),
            'kernel_spec': str(kernel.sharding.spec), 'step': int(state.step)}


@pytest.mark.slow
def test_each_device_draws_from_its_own_shard_on_8_devices():
    # LLVM -O0 as in test_multihost: compiling the model's init takes a tenth of the time, and both
    # sides of the training comparison get the same flags.
    env = dict(os.environ, JAX_PLATFORMS='cpu',
               XLA_FLAGS='--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0')
    env['PYTHONPATH'] = str(ROOT) + os.pathsep + env.get('PYTHONPATH', '')
    result = subprocess.run([sys.executable, __file__], cwd=ROOT / 'tests', env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    shards, per_shard = 8, SHARDED_N // 8  # 6 each, 48 kept

    for name in ('8x1', '4x2'):
        held, drawn = out[name]['held'], out[name]['drawn']
        assert len(held) == shards and all(len(ids) == per_shard for _, ids in held.values())
        kept = [i for _, ids in held.values() for i in ids]
        assert len(set(kept)) == shards * per_shard and set(kept) <= set(range(SHARDED_N))
        left_over = set(range(SHARDED_N)) - set(kept)
        assert len(left_over) == SHARDED_N % shards
        assert sorted(position for position, _ in held.values()) == list(range(shards))

        local_orders, first_epoch = set(), []
        for device, (position, own) in held.items():
            # The device's slice of every global batch sits where its shard of the data sits...
            assert all(step[device][0] == position for step in drawn), name
            s = np.concatenate([step[device][1] for step in drawn])
            assert len(s) == SHARDED_STEPS * LOCAL_BATCH  # 20 draws: 3 full epochs of 6 and 2 more
            # ...and cycles through its own examples, each exactly once per epoch.
            for e in range(len(s) // per_shard):
                assert sorted(s[e * per_shard:(e + 1) * per_shard]) == sorted(own), (name, device, e, s)
            local_orders.add(tuple(own.index(i) for i in s[:per_shard]))
            first_epoch.extend(s[:per_shard])
        assert len(local_orders) > 1, 'every shard shuffles its examples in the same order'
        # One epoch over all devices draws every kept example once, and the left-over never.
        assert sorted(first_epoch) == sorted(kept)
        assert not left_over & {i for ids in out[name]['global'] for i in ids}
        for t, ids in enumerate(out[name]['global']):
            by_position = {position: ids_ for position, ids_ in drawn[t].values()}
            assert ids == [i for p in range(shards) for i in by_position[p]]

    # Batch t is a function of (seed, t, number of shards) alone, not of the mesh's shape.
    assert out['8x1']['global'] == out['4x2']['global']
    # The real train step on a sharded mesh trains on exactly the batches batch_at draws: only the
    # float32 summation order across shards differs from one device (as in test_train's 1e-5).
    training = out['training']
    assert training['step'] == 2 and training['kernel_spec'] == "P(None, None, None, 'fsdp')", training
    assert training['difference'] < 1e-5 and training['moved'] > 1e-2, training
    assert out['errors'] == {
        'put': 'the dataset has 7 examples, fewer than the 8 data shards',
        'batch_at': 'a batch of 7 per shard exceeds the 6 examples each shard holds'}


def test_a_batch_larger_than_a_shard_is_refused():
    mesh = one_device_mesh()
    data = device_data.put(id_dataset(12), mesh, 0)
    drawer(mesh, 0, 12)(data, jnp.int32(0))  # a whole epoch per batch is fine
    with pytest.raises(ValueError, match='^a batch of 13 per shard exceeds the 12 examples each shard holds'):
        drawer(mesh, 0, 13)(data, jnp.int32(0))
    with pytest.raises(ValueError, match='^the dataset has 0 examples, fewer than the 1 data shards'):
        device_data.put(id_dataset(0), mesh, 0)
    # The config check refuses such a run before anything is loaded or traced, on any mesh: the
    # batch must fit in the examples kept (N // shards per shard), here 24 of 24 and 24 of 31.
    validate = config_lib.validate
    validate(tiny_config(**{'data.feed': 'device', 'batch_size': 24}), 1, 24)
    validate(tiny_config(**{'data.feed': 'device', 'batch_size': 24}), 8, 31)
    validate(tiny_config(**{'batch_size': 32}), 1, 24)  # the host feed wraps around epochs instead
    for devices, num_train, kept in ((1, 24, 24), (8, 31, 24)):
        with pytest.raises(ConfigError, match=f"^config.batch_size: 32 exceeds the {kept} examples that "
                                                         f"data.feed='device' holds over {devices} shards"):
            validate(tiny_config(**{'data.feed': 'device'}), devices, num_train)
    with pytest.raises(ConfigError, match='config.batch_size: 32 exceeds the 24 examples'):
        Run(tiny_config(**{'data.feed': 'device', 'data.num_train': 24}))


def resume_config(num_steps: int):
    # No augmentation: the batch is then the only thing that differs between train steps taken
    # at different step numbers, which the control below relies on. A constant schedule (after
    # 2 warm-up steps) does not depend on num_steps, so a 4-step run is a prefix of an 8-step one.
    return tiny_config(**{'data.feed': 'device', 'data.augment': 'none', 'optim.schedule': 'constant',
                          'num_steps': num_steps, 'checkpoint.every_steps': 4, 'eval.every_steps': 8})


def params_at(workdir, step: int, run: Run):
    manager = checkpoint.Manager(os.path.join(workdir, 'checkpoints'), run.config, read_only=True)
    restored = manager.restore(run.abstract_state, step)
    manager.close()
    return restored.state


def leaves(state):
    return jax.tree_util.tree_leaves(jax.device_get({'params': state.params, 'batch_stats': state.batch_stats}))


@pytest.mark.slow
def test_resumed_device_fed_run_matches_an_uninterrupted_one(tmp_path):
    stopped, whole = str(tmp_path / 'stopped'), str(tmp_path / 'whole')
    train_and_evaluate(resume_config(4), stopped)  # stops after the checkpoint at step 4
    train_and_evaluate(resume_config(8), stopped)  # restarts from it
    train_and_evaluate(resume_config(8), whole)
    starts = [r['step'] for r in metrics_lib.read_metrics(stopped) if 'perf/compile_seconds' in r]
    assert starts == [0, 4], 'the second run did not resume from step 4'

    run = Run(resume_config(8))
    resumed, uninterrupted = params_at(stopped, 8, run), params_at(whole, 8, run)
    assert int(resumed.step) == int(uninterrupted.step) == 8
    for a, b in zip(leaves(resumed), leaves(uninterrupted)):
        np.testing.assert_array_equal(a, b)  # bit-identical

    # Control: steps 4..7 replayed from the step-4 checkpoint reproduce the run, while the same
    # steps numbered 0..3 (optimizer state unchanged, so the same learning rates) draw batches
    # 0..3 again and end elsewhere. Were batch_at to ignore the step, both would match.
    dataset, rng = run.train_inputs(0)[1](), jax.random.key(run.config.seed)
    for first_step, should_match in ((4, True), (0, False)):
        state = params_at(stopped, 4, run)
        state = state.replace(step=jax.device_put(jnp.int32(first_step), state.step.sharding))
        for _ in range(4):
            state, _ = run.train_step(state, dataset, rng)
        same = all(np.array_equal(a, b) for a, b in zip(leaves(state), leaves(uninterrupted)))
        assert same == should_match, f'replay numbered from step {first_step}'


@pytest.mark.slow
def test_device_fed_training_learns_shapes(tmp_path):
    # 150 steps of 32 on 16x16 'shapes' without augmentation (padding by 4 would crop most of a
    # small image away). Measured on a 2-core CPU: eval/top1 0.54 on the 300 test images (0.44
    # with data.feed='host', whose data order differs); chance is 0.1, where labels shuffled
    # apart from their images would leave it.
    config = tiny_config(**{'data.feed': 'device', 'data.augment': 'none', 'data.image_size': 16,
                            'data.num_train': 2048, 'data.num_eval': 300, 'eval.batch_size': 100,
                            'num_steps': 150, 'optim.warmup_steps': 10, 'log.every_steps': 50,
                            'eval.every_steps': 150, 'checkpoint.every_steps': 150})
    final = train_and_evaluate(config, str(tmp_path))
    assert final['eval/top1'] > 0.35, final


if __name__ == '__main__':
    json.dump(sharded_draws(), sys.stdout)
