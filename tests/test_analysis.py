"""The analysis tools: their defining properties, and every tool end to end from the command line."""

import itertools
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from helpers import images, tiny_config
from jax.sharding import Mesh

from resnet_jax.analyze import common, gradient_flow, landscape, paths
from resnet_jax.models import get_model
from resnet_jax.train import step as step_lib

REPO = Path(__file__).resolve().parents[1]


def tiny(**fields):
    return get_model('resnet20', stage_sizes=(1, 1, 1), widths=(4, 8, 8), stem_width=4, **fields)


def init(model, x, seed=0):
    return jax.jit(model.init)(jax.random.key(seed), x)  # compiled once rather than op by op


# --- properties ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_filter_normalised_direction_has_each_filters_norm_and_zero_rank1_entries():
    x = images((2, 8, 8, 3))
    model = tiny(skip='exclusive_gate', se_ratio=0.5)  # gates and SE add biased convs; the head a biased dense
    params = init(model, x)['params']
    d = jax.jit(landscape.filter_normalized_direction)(jax.random.key(3), params)
    flat_w, flat_d = traverse_util.flatten_dict(params), traverse_util.flatten_dict(d)
    assert {p[-1] for p in flat_w} >= {'kernel', 'bias', 'scale'}
    for path, w in flat_w.items():
        w, v = np.asarray(w), np.asarray(flat_d[path])
        if w.ndim <= 1:
            assert not v.any(), path
        else:
            axes = tuple(range(w.ndim - 1))
            norm = lambda a: np.sqrt(np.sum(a.astype(np.float64) ** 2, axis=axes))
            np.testing.assert_allclose(norm(v), norm(w), rtol=1e-5)
            assert not np.allclose(v, w)  # a random direction, not the weights


@pytest.mark.slow
def test_landscape_points_equal_the_models_loss_at_the_moved_weights():
    x = images((10, 8, 8, 3))
    y = np.arange(10) % 10
    model = tiny()
    variables = init(model, x)
    d1, d2 = (jax.jit(landscape.filter_normalized_direction)(k, variables['params']) for k in jax.random.split(jax.random.key(1)))
    mesh = Mesh(np.asarray(jax.devices()).reshape(-1, 1), ('data', 'fsdp'))
    coords = np.array([[0.0, 0.0], [0.5, -0.25], [-1.0, 1.0]])
    loss, acc = landscape.point_evaluator(model, variables, (d1, d2), x, y, 4, mesh, 2)(coords)
    for (a, b), l, c in zip(coords, loss, acc):
        moved = jax.tree_util.tree_map(lambda w, u, v: w + a * u + b * v, variables['params'], d1, d2)
        logits = jax.jit(model.apply)(dict(variables, params=moved), x)
        np.testing.assert_allclose(l, step_lib.cross_entropy(logits, y, 10).mean(), rtol=1e-5)
        np.testing.assert_allclose(c, np.mean(np.argmax(logits, -1) == y), atol=1e-7)
    assert loss[1] != loss[0]


@pytest.mark.slow
def test_deep_plain_nets_first_block_gradient_is_orders_of_magnitude_below_its_residual_twins():
    """The product of branch Jacobians (no normalisation, He init) against the same product with the identity."""
    x, y = images((16, 8, 8, 3)), jnp.arange(16) % 10
    first = {}
    for skip in ('identity', 'none'):
        model = get_model('resnet20', stage_sizes=(5, 5, 5), widths=(8, 8, 8), stem_width=8, norm='none', skip=skip)
        _, stream, weights = jax.jit(lambda v: gradient_flow.stream_gradients(model, v, x, y, False))(init(model, x))
        assert stream.shape == (16,) and weights.shape == (15,)
        first[skip] = float(stream[0])
    assert first['identity'] / first['none'] > 1e3, first


@pytest.mark.slow
def test_deleting_a_zero_initialised_branch_leaves_the_output_unchanged():
    x = images((2, 8, 8, 3))
    zero = tiny(branch_init='zero_gamma')
    v, apply = init(zero, x), jax.jit(zero.apply)
    for block in range(3):
        keep = jnp.ones(3).at[block].set(0.0)
        np.testing.assert_allclose(apply(v, x, keep=keep), apply(v, x), rtol=1e-6, atol=1e-7)
    standard = tiny()
    v, apply = init(standard, x), jax.jit(standard.apply)
    assert not np.allclose(apply(v, x, keep=jnp.array([1.0, 0.0, 1.0])), apply(v, x))


def test_a_deleted_plain_block_is_the_identity_and_downsampling_blocks_stay():
    x = images((2, 8, 8, 3))
    model = get_model('plain20', stage_sizes=(2, 1, 1), widths=(4, 8, 8), stem_width=4)
    v = init(model, x)
    _, state = model.apply(v, x, keep=jnp.array([1.0, 0.0, 1.0, 1.0]), mutable=['intermediates'])
    inter = state['intermediates']
    np.testing.assert_array_equal(inter['stage1_block1']['output'][0], inter['stage1_block0']['output'][0])
    from resnet_jax.analyze.lesion import deletable_blocks
    assert deletable_blocks(model, v, x) == [0, 1]


def test_path_lengths_are_binomial_and_single_paths_sum_to_the_full_gradient():
    for blocks in (1, 5, 9):
        brute = [sum(1 for s in itertools.product((0, 1), repeat=blocks) if sum(s) == k) for k in range(blocks + 1)]
        assert paths.path_counts(blocks) == brute == [math.comb(blocks, k) for k in range(blocks + 1)]
        np.testing.assert_allclose(paths.path_length_distribution(blocks).sum(), 1.0)
    # Veit et al.'s routing leaves one path per mask: the 2^L path gradients add up to the whole gradient.
    x, y = images((4, 8, 8, 3)), jnp.arange(4)
    model = tiny()
    v = init(model, x)
    grad = jax.jit(lambda route: jax.grad(lambda xi: common.batch_loss(model, v, xi, y, False, grad_route=route))(x))
    total = sum(grad(jnp.asarray(mask, jnp.float32)) for mask in itertools.product((0, 1), repeat=3))
    np.testing.assert_allclose(total, grad(None), rtol=1e-4, atol=1e-7)
    assert np.all(np.abs(grad(jnp.zeros(3))) < np.abs(grad(None)).max())


# --- every tool from the command line, on tiny trained runs --------------------------------------

@pytest.fixture(scope='module')
def sweep(tmp_path_factory):
    """A sweep directory with an 8-block residual net and its plain twin, trained for 20 steps."""
    from resnet_jax import sweep as sweep_lib
    from resnet_jax.train.loop import train_and_evaluate

    root = tmp_path_factory.mktemp('sweep')
    entries, runs = [], []
    for name, skip in (('resnet', 'identity'), ('plain', 'none')):
        overrides = {'model.stage_sizes': (3, 3, 2), 'model.skip': skip, 'num_steps': 20, 'eval.every_steps': 10,
                     'checkpoint.every_steps': 10, 'log.every_steps': 5}
        train_and_evaluate(tiny_config(**overrides), str(root / name))
        entries.append(overrides)
        runs.append(sweep_lib.RunSpec(name, str(REPO / 'experiments' / 'quickstart.py'), str(root / name), overrides))
    sweep_lib.record(str(root), {'config': str(REPO / 'experiments' / 'quickstart.py'), 'entries': entries}, runs)
    return root


def analyze(*args):
    return subprocess.run([sys.executable, '-m', 'resnet_jax.analyze', *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def read(path):
    return json.loads(Path(path).read_text())


def final_eval(workdir):
    records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
    return [r for r in records if 'eval/top1' in r][-1]


@pytest.mark.slow
def test_every_tool_runs_from_the_command_line(sweep):
    resnet, plain = sweep / 'resnet', sweep / 'plain'
    result = analyze('all,degradation', f'--workdir={resnet}', f'--compare={plain}', f'--sweep_dir={sweep}',
                     '--num_examples=0', '--batch_size=64', '--grid=5', '--draws=2', '--max_deleted=2')
    assert result.returncode == 0, result.stderr[-3000:]
    out = resnet / 'analysis'
    for tool, pngs in (('gradient-flow', ['gradient_flow']), ('signal', ['signal']), ('lesion', ['lesion']),
                       ('paths', ['paths']), ('landscape', ['landscape_1d', 'landscape_contour', 'landscape_surface'])):
        for name in pngs:
            assert (out / tool / f'{name}.png').stat().st_size > 5000
        assert (out / tool / 'summary.md').read_text().startswith('# ')
        assert len((out / tool / f'{pngs[0].split("_1d")[0]}.csv').read_text().splitlines()) > 2

    flow = read(out / 'gradient-flow' / 'gradient_flow.json')
    assert [s['label'] for s in flow['subjects']] == ['resnet', 'plain']
    for s in flow['subjects']:
        assert [st['step'] for st in s['states']] == [0, 10, 20]
        assert all(len(st['stream_grad_norm']) == 9 and len(st['weight_grad_norm']) == 8 for st in s['states'])

    signal = read(out / 'signal' / 'signal.json')
    for s in signal['subjects']:
        assert [st['step'] for st in s['states']] == [0, 20]
        # At init in train mode every branch ends in a BatchNorm (scale 1, bias 0): unit channel variance.
        np.testing.assert_allclose(s['states'][0]['branch']['channel_var'], 1.0, atol=1e-3)
        assert len(s['states'][1]['stream']['mean']) == 9

    lesion = read(out / 'lesion' / 'lesion.json')
    res, pl = lesion['subjects']
    assert lesion['examples'] == 103 and res['deletable'] == list(range(8)) and res['kept_in_place'] == []
    assert pl['kept_in_place'] == ['stage2_block0', 'stage3_block0'] and len(pl['single']) == 6
    for subject, workdir in ((res, resnet), (pl, plain)):  # the whole split, nothing deleted = the run's evaluation
        np.testing.assert_allclose(subject['baseline']['accuracy'], final_eval(workdir)['eval/top1'], atol=1e-6)
        np.testing.assert_allclose(subject['baseline']['loss'], final_eval(workdir)['eval/loss'], rtol=1e-5)
        assert [r['k'] for r in subject['random']] == [1, 2] and all(len(r['accuracies']) == 2 for r in subject['random'])

    path_info = read(out / 'paths' / 'paths.json')
    assert path_info['skipped_plain'] == ['plain']
    lengths = path_info['subjects'][0]['lengths']
    np.testing.assert_allclose([e['fraction_of_paths'] for e in lengths], [math.comb(8, k) / 256 for k in range(9)])
    assert [e['samples'] for e in lengths] == [1, 2, 2, 2, 2, 2, 2, 2, 1]
    np.testing.assert_allclose(sum(e['fraction_of_gradient'] for e in lengths), 1.0)

    land = read(out / 'landscape' / 'landscape.json')
    for subject, les in zip(land['subjects'], (res, pl)):
        assert np.asarray(subject['grid']['loss']).shape == (5, 5) and len(subject['line']['loss']) == 5
        np.testing.assert_allclose(subject['centre']['loss'], les['baseline']['loss'], rtol=1e-5)
        np.testing.assert_allclose(subject['line']['loss'][2], les['baseline']['loss'], rtol=1e-5)

    degradation = sweep / 'analysis' / 'degradation'
    rows = (degradation / 'degradation.csv').read_text().splitlines()
    assert rows[0].startswith('kind,depth,run') and len(rows) == 3
    table = {r['kind']: r for r in read(degradation / 'degradation.json')['runs']}
    assert table['plain']['depth'] == table['residual']['depth'] == 18  # stem + 8 blocks x 2 convs + head
    np.testing.assert_allclose(table['residual']['test_error'][-1][1], 100 * (1 - final_eval(resnet)['eval/top1']))
    assert (degradation / 'degradation.png').stat().st_size > 5000


@pytest.mark.slow
def test_bad_arguments_fail_before_any_work(sweep, tmp_path):
    from resnet_jax import analyze as cli
    from resnet_jax.train.config import from_file

    options = common.Options()
    for call, message in [
        (lambda: cli.parse_tools('lesion,lesions'), "unknown tool 'lesions'; choose from: gradient-flow"),
        (lambda: cli.analyse(['lesion'], options), 'need exactly one of --workdir=<run> and --config=<file>'),
        (lambda: cli.analyse(['lesion'], options, workdir=str(tmp_path)), 'has no config.json'),
        (lambda: cli.analyse(['paths'], options, workdir=str(sweep / 'plain')), 'paths needs a residual net'),
        (lambda: cli.analyse(['degradation'], options), 'degradation needs --sweep_dir'),
        (lambda: cli.analyse(['signal'], options, config=from_file(str(REPO / 'experiments' / 'quickstart.py'))),
         'give --out=<directory>'),
        (lambda: common.Options(bn='batch'), "bn='batch' is not allowed; choose one of: 'train', 'eval'"),
        (lambda: common.Options(grid=1), '--grid=1 must be an integer >= 2'),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            call()
    assert not (tmp_path / 'analysis').exists()
    result = analyze('lesions', f'--workdir={sweep / "resnet"}')  # the command prints the message and exits 2
    assert result.returncode == 2 and "error: unknown tool 'lesions'" in result.stderr
