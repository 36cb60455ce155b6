"""Sweeps: the expansion algebra, run names, validation before launch, sweep.json, the local
launcher (exit codes, device pinning, stop signals) and a real tiny sweep that is launched,
skipped, resumed and tabulated."""

import csv
import json
import os
import re
import shutil
import signal
import threading
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
from test_train import run_module

from resnet_jax import sweep
from resnet_jax.launch import local
from resnet_jax.sweep import (
    RunSpec,
    SweepError,
    log_uniform,
    product,
    results,
    sample,
    seeds,
    uniform,
    zipped,
)
from resnet_jax.train import config as config_lib

ROOT = Path(__file__).parents[1]
# An experiment file's imports and get_config (tiny runs); each test file adds its own get_sweep.
TINY_HEADER = f'''
import sys

from resnet_jax.sweep import product, seeds

sys.path.insert(0, {str(ROOT / 'tests')!r})
from helpers import tiny_config


def get_config(arg='resnet20'):
    return tiny_config(**{{'model.name': arg, 'data.num_train': 256, 'data.num_eval': 100, 'batch_size': 16,
                          'eval.batch_size': 20, 'log.every_steps': 2, 'eval.every_steps': 4,
                          'checkpoint.every_steps': 4}})
'''
TINY_EXPERIMENT = TINY_HEADER + '''

def get_sweep(arg=''):
    if arg == 'bad':
        return [{'arg': 'resnet20', 'optim.name': 'adam'}]
    return product([{'arg': 'resnet20'}], seeds(2)) + [{'arg': 'plain20', 'optim.lr': 0.05}]
'''


def write_experiment(tmp_path) -> str:
    path = tmp_path / 'tiny.py'
    path.write_text(TINY_EXPERIMENT)
    return str(path)


def test_product_zip_seeds():
    runs = product({'model.name': ['resnet20', 'plain20'], 'optim.lr': [0.1, 0.2, 0.4]}, seeds(2))
    assert len(runs) == 12
    assert runs[0] == {'model.name': 'resnet20', 'optim.lr': 0.1, 'seed': 0}
    assert runs[-1] == {'model.name': 'plain20', 'optim.lr': 0.4, 'seed': 1}
    assert len({json.dumps(r, sort_keys=True) for r in runs}) == 12
    assert zipped({'model.skip_scale': [0.0, 0.5], 'model.branch_scale': [1.0, 0.5]}) == [
        {'model.skip_scale': 0.0, 'model.branch_scale': 1.0}, {'model.skip_scale': 0.5, 'model.branch_scale': 0.5}]
    assert seeds(3, first=5) == [{'seed': 5}, {'seed': 6}, {'seed': 7}]
    assert product([{'a': 1}, {'a': 2}], [{}]) == [{'a': 1}, {'a': 2}]
    with pytest.raises(SweepError, match="key 'seed' is set by two factors"):
        product(seeds(2), {'seed': [3]})
    with pytest.raises(SweepError, match='one length'):
        zipped({'a': [1, 2], 'b': [1]})
    with pytest.raises(SweepError, match='non-empty list'):
        product({'a': []})


def test_sample_is_deterministic_distinct_and_in_range():
    space = {'optim.lr': log_uniform(0.01, 1.0), 'optim.momentum': uniform(0.8, 0.99, digits=2),
             'model.name': ['resnet20', 'resnet32']}
    a, b, c = sample(space, 20, seed=1), sample(space, 20, seed=1), sample(space, 20, seed=2)
    assert a == b and a != c and len(a) == 20
    assert len({json.dumps(p, sort_keys=True) for p in a}) == 20
    for point in a:
        assert 0.01 <= point['optim.lr'] <= 1.0 and float(f"{point['optim.lr']:.3g}") == point['optim.lr']
        assert 0.8 <= point['optim.momentum'] <= 0.99 and round(point['optim.momentum'], 2) == point['optim.momentum']
        assert point['model.name'] in ('resnet20', 'resnet32')
    assert sorted(p['model.name'] for p in sample({'model.name': ['a', 'b', 'c']}, 3)) == ['a', 'b', 'c']
    with pytest.raises(SweepError, match='only 2 distinct points'):
        sample({'model.name': ['a', 'b']}, 3)


def test_names_are_deterministic_safe_and_unique():
    entries = [{'arg': 'resnet110', 'model.skip': 'scale', 'model.skip_scale': 0.5, 'seed': 0},
               {'arg': 'resnet110', 'model.skip': 'exclusive_gate', 'model.gate_bias_init': -6.0, 'seed': 1},
               {'model.stage_sizes': (1, 2, 3), 'optim.lr': 1e-4, 'data.dataset': 'folder:/tmp/x y'},
               {'model.dtype': 'bfloat16', 'data.dtype': 'x'}, {}, {'arg': '..'}]
    names = sweep.run_names(entries)
    assert names == ['resnet110,skip=scale,skip_scale=0.5,seed=0',
                     'resnet110,skip=exclusive_gate,gate_bias_init=-6,seed=1',
                     'stage_sizes=1-2-3,lr=0.0001,dataset=folder--tmp-x-y',
                     'model.dtype=bfloat16,data.dtype=x', 'default', '_..']
    assert names == sweep.run_names(entries)
    long = sweep.run_names([{'optim.lr': 0.1, 'x': 'a' * 300}, {'optim.lr': 0.2, 'x': 'a' * 300}])
    assert all(len(n) <= sweep.MAX_NAME for n in long) and long[0] != long[1]
    with pytest.raises(SweepError, match=r"runs 0 .*'a/b'.* and 1 .*'a:b'.* both get the directory name 'name=a-b'"):
        sweep.run_names([{'model.name': 'a/b'}, {'model.name': 'a:b'}])


def test_train_args_survive_the_command_line(tmp_path):
    run = RunSpec('r', str(ROOT / 'experiments' / 'cifar10.py') + ':resnet110', str(tmp_path / 'r'),
                  {'model.stage_sizes': (1, 1, 1), 'model.remat': True, 'optim.lr': 0.05, 'seed': 3,
                   'mesh.param_rules': (('.*', 'fsdp'),), 'model.skip': 'none'})
    assert run.train_args()[:4] == ['-m', 'resnet_jax.train', f'--config={run.config}', f'--workdir={run.workdir}']
    config = sweep.resolve(run)
    assert config.model.stage_sizes == (1, 1, 1) and config.model.remat is True and config.optim.lr == 0.05
    assert config.seed == 3 and config.mesh.param_rules == (('.*', 'fsdp'),) and config.model.skip == 'none'
    assert config.optim.warmup_steps == 400  # get_config('resnet110') ran


def test_settings_for_every_run_from_the_sweep_command(tmp_path):
    """`python -m resnet_jax.sweep ... --config.<key>=<value>` reaches every run's command and config, is part
    of the recorded definition (a re-launch with other settings is refused) and may not set a swept key."""
    spec, sweep_dir = write_experiment(tmp_path), str(tmp_path / 'sw')
    common = ('--config.data.feed=device', '--config.optim.weight_decay=0.0005')
    result = run_module(['-m', 'resnet_jax.sweep', f'--config={spec}', f'--sweep_dir={sweep_dir}', '--dry_run', *common])
    assert result.returncode == 0, result.stderr[-3000:]
    commands = [line for line in result.stdout.splitlines() if ' -m resnet_jax.train ' in line]
    assert len(commands) == 3 and all(line.split(' >> ')[0].endswith(' '.join(common)) for line in commands)
    definition, runs = sweep.expand(spec, sweep_dir, common)
    assert definition['common'] == list(common) and [r.name for r in runs] == ['resnet20,seed=0', 'resnet20,seed=1',
                                                                               'plain20,lr=0.05']
    for run, config in zip(runs, sweep.validate_runs(runs)):
        assert config.data.feed == 'device' and config.optim.weight_decay == 0.0005
    assert sweep.resolve(runs[2]).optim.lr == 0.05
    sweep.record(sweep_dir, definition, runs)
    assert sweep.load(sweep_dir) == (definition, runs)
    with pytest.raises(SweepError, match=r"its runs all had \['--config.data.feed=device', .*\], these \[\]"):
        sweep.record(sweep_dir, *sweep.expand(spec, sweep_dir))
    with pytest.raises(SweepError, match=r"--config.optim.lr=0.1 sets 'optim.lr', which the sweep itself sets"):
        sweep.expand(spec, sweep_dir, ('--config.optim.lr=0.1',))


@pytest.mark.parametrize('override, message', [
    ({'optim.lr': 'fast'}, r"run bad: .*optim.lr.*fast"),
    ({'model.skp': 'none'}, r"run bad: --config.model.skp: config.model has no field 'skp'. Did you mean: skip\?"),
    ({'optim.name': 'adam'}, r"run bad: config.optim.name: name='adam' is not allowed; choose one of: 'sgd'"),
    ({'num_steps': 4, 'optim.schedule': 'piecewise', 'optim.boundaries': (5,)},
     r'run bad: config.optim.boundaries: boundary at step 5'),
])
def test_bad_runs_fail_validation_naming_run_and_field(tmp_path, override, message):
    run = RunSpec('bad', write_experiment(tmp_path) + ':resnet20', str(tmp_path / 'bad'), override)
    with pytest.raises(SweepError, match=message):
        sweep.validate_runs([run])


def test_sweep_json_written_once_and_a_different_sweep_refused(tmp_path):
    spec = write_experiment(tmp_path)
    definition, runs = sweep.expand(spec, str(tmp_path / 'sw'))
    assert [r.name for r in runs] == ['resnet20,seed=0', 'resnet20,seed=1', 'plain20,lr=0.05']
    assert runs[2].config == f'{spec}:plain20' and runs[2].overrides == {'optim.lr': 0.05}
    assert runs[2].workdir == str(tmp_path / 'sw' / 'plain20,lr=0.05')
    sweep.record(str(tmp_path / 'sw'), definition, runs, write=False)
    assert not (tmp_path / 'sw').exists()  # a dry run writes nothing
    sweep.record(str(tmp_path / 'sw'), definition, runs)
    recorded = json.loads((tmp_path / 'sw' / 'sweep.json').read_text())
    assert recorded['definition']['config'] == spec and len(recorded['runs']) == 3
    assert sweep.load(str(tmp_path / 'sw')) == (definition, runs)
    sweep.record(str(tmp_path / 'sw'), definition, runs)  # the same sweep again: accepted
    other, other_runs = sweep.expand(f'{spec}:bad', str(tmp_path / 'sw'))
    with pytest.raises(SweepError, match=r"holds a different sweep \(it was made from .*tiny.py, this one from "
                                         r".*tiny.py:bad\). Use another --sweep_dir"):
        sweep.record(str(tmp_path / 'sw'), other, other_runs)
    changed = dict(definition, entries=definition['entries'][:2])
    with pytest.raises(SweepError, match=r"runs only there: \['plain20,lr=0.05'\]; runs only here: \[\]"):
        sweep.record(str(tmp_path / 'sw'), changed, runs[:2])
    assert json.loads((tmp_path / 'sw' / 'sweep.json').read_text()) == recorded


def test_a_get_sweep_that_fails_is_named(tmp_path):
    (tmp_path / 'exp.py').write_text('def get_config():\n    pass\n\n\ndef get_sweep(arg):\n'
                                     '    raise ValueError(f"no sweep {arg!r}: use a or b")\n')
    with pytest.raises(SweepError, match=r"exp.py: get_sweep\('c'\) failed: ValueError: no sweep 'c': use a or b"):
        sweep.expand(f'{tmp_path}/exp.py:c', str(tmp_path / 'sw'))


def test_a_moved_or_copied_sweep_keeps_its_finished_runs(tmp_path):
    """sweep.json names workdirs relative to the sweep directory; an old record of absolute paths
    is read as if they were inside the sweep directory wherever it is now."""
    spec = write_experiment(tmp_path)
    definition, runs = sweep.expand(spec, str(tmp_path / 'sw'))
    sweep.record(str(tmp_path / 'sw'), definition, runs)
    assert [r['workdir'] for r in json.loads((tmp_path / 'sw' / 'sweep.json').read_text())['runs']] == \
        ['resnet20,seed=0', 'resnet20,seed=1', 'plain20,lr=0.05']
    (tmp_path / 'sw' / runs[1].name).mkdir()
    (tmp_path / 'sw' / runs[1].name / 'done.json').write_text('{}')
    shutil.copytree(tmp_path / 'sw', tmp_path / 'copy of sw')
    shutil.move(tmp_path / 'sw', tmp_path / 'moved')
    for where in ('copy of sw', 'moved'):
        _, loaded = sweep.load(str(tmp_path / where))
        assert [r.workdir for r in loaded] == [str(tmp_path / where / r.name) for r in runs]
        assert [sweep.run_state(r.workdir) for r in loaded] == ['new', 'finished', 'new']
    old = json.loads((tmp_path / 'moved' / 'sweep.json').read_text())  # as written before: absolute paths
    for r in old['runs']:
        r['workdir'] = str(tmp_path / 'sw' / r['workdir'])
    (tmp_path / 'moved' / 'sweep.json').write_text(json.dumps(old))
    _, loaded = sweep.load(str(tmp_path / 'moved'))
    assert [sweep.run_state(r.workdir) for r in loaded] == ['new', 'finished', 'new']


def test_run_state(tmp_path):
    assert sweep.run_state(str(tmp_path / 'missing')) == 'new'
    (tmp_path / 'checkpoints' / '8.orbax-checkpoint-tmp-1').mkdir(parents=True)
    assert sweep.run_state(str(tmp_path)) == 'new'  # a save that never completed
    (tmp_path / 'checkpoints' / '4').mkdir()
    assert sweep.run_state(str(tmp_path)) == 'unfinished'
    (tmp_path / 'done.json').write_text('{}')
    assert sweep.run_state(str(tmp_path)) == 'finished'


class ScriptRun(RunSpec):
    """A run whose command is a Python snippet instead of a training, to exercise the launcher alone."""

    def train_args(self):
        return ['-c', self.config]


def launch_options(**kw):
    return Namespace(**{'local_parallel': 1, 'local_devices_per_run': 0, 'local_device_ids': None, 'dry_run': False,
                        'local_memory_fraction': None, **kw})


def test_local_launcher_exit_codes_pinning_and_busy_runs(tmp_path, capsys):
    codes = {'ok': 0, 'preempted': 75, 'broken': 3, 'busy': 0}
    runs = [ScriptRun(name, f'import os, sys; print(os.environ.get("CUDA_VISIBLE_DEVICES")); sys.exit({code})',
                      str(tmp_path / name), {}) for name, code in codes.items()]
    from resnet_jax import workdir
    with workdir.Lock(runs[3].workdir):  # a training (another launcher's) holds it
        code = local.launch(runs, str(tmp_path), launch_options(local_parallel=2, local_devices_per_run=2,
                                                                 local_device_ids=['0', '1', '2', '3']))
    out = capsys.readouterr().out
    assert code == 1
    assert '1 of 4 runs finished; 2 unfinished (launch the sweep again to resume them); 1 failed: broken (exit 3)' in out
    assert 'busy: skipped: another process is training in its workdir' in out and 'preempted: stopped after saving' in out
    assert not Path(runs[3].workdir, local.LOG_FILE).exists()  # never started
    logs = {r.name: Path(r.workdir, local.LOG_FILE).read_text() for r in runs[:3]}
    for name in ('ok', 'preempted', 'broken'):
        pinned = re.search(r'^# \S+ CUDA_VISIBLE_DEVICES=(\S+) ', logs[name], re.M).group(1)
        assert pinned in ('0,1', '2,3') and logs[name].splitlines()[-1] == pinned  # the child saw it
    assert local.launch(runs[1:2], str(tmp_path), launch_options()) == 75
    with pytest.raises(local.LaunchError, match=r'--local_parallel=3 x --local_devices_per_run=2 needs 6 devices; '
                                                r'there are 4 \(0,1,2,3\)'):
        local.launch(runs, str(tmp_path), launch_options(local_parallel=3, local_devices_per_run=2,
                                                         local_device_ids=['0', '1', '2', '3']))


def test_local_launcher_shares_a_gpu_by_memory_fraction(tmp_path, capsys):
    """Several runs on one GPU each get their share of its memory, which the child sees; shares that add
    up to more than the device are refused before anything starts."""
    runs = [ScriptRun(f'r{i}', 'import os; print(os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"])',
                      str(tmp_path / f'r{i}'), {}) for i in range(3)]
    assert local.launch(runs, str(tmp_path), launch_options(local_parallel=3, local_memory_fraction=0.3)) == 0
    assert all(Path(r.workdir, local.LOG_FILE).read_text().splitlines()[-1] == '0.3' for r in runs)
    with pytest.raises(local.LaunchError, match=r'--local_memory_fraction=0.4: 3 run\(s\) share each device, so it '
                                                r'must be in \(0, 0.333\]'):
        local.launch(runs, str(tmp_path / 'x'), launch_options(local_parallel=3, local_memory_fraction=0.4))
    # Pinned to their own GPUs, runs do not share: each may take up to all of its device.
    pinned = launch_options(local_parallel=2, local_devices_per_run=1, local_device_ids=['0', '1'],
                            local_memory_fraction=0.9, dry_run=True)
    assert local.launch(runs, str(tmp_path), pinned) == 0
    assert 'CUDA_VISIBLE_DEVICES=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 ' in capsys.readouterr().out


@pytest.mark.system
def test_local_launcher_passes_sigterm_on(tmp_path, capsys):
    """SIGTERM to the launcher reaches every running run (which saves and exits 75); the runs not yet
    started are not started, and all of them count as unfinished."""
    script = ('import signal, sys, time, pathlib; signal.signal(signal.SIGTERM, lambda *a: sys.exit(75)); '
              'pathlib.Path("ready").touch(); time.sleep(60)')
    runs = [ScriptRun(f'r{i}', script.replace('"ready"', repr(str(tmp_path / f'ready{i}'))), str(tmp_path / f'r{i}'),
                      {}) for i in range(3)]

    def stop_when_ready():
        deadline = time.monotonic() + 30
        while not all((tmp_path / f'ready{i}').exists() for i in range(2)) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=stop_when_ready, daemon=True).start()
    start = time.monotonic()
    assert local.launch(runs, str(tmp_path), launch_options(local_parallel=2)) == 75
    assert time.monotonic() - start < 30
    assert not (tmp_path / 'ready2').exists()
    assert '0 of 3 runs finished; 3 unfinished' in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) is previous


def cli_env(tmp_path) -> dict:
    """Fast compiles for tiny runs: LLVM -O0 and a compilation cache shared by the runs."""
    return {'XLA_FLAGS': '--xla_backend_optimization_level=0', 'JAX_PLATFORMS': 'cpu',
            'JAX_COMPILATION_CACHE_DIR': str(tmp_path / 'jax_cache'), 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
            'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0', 'PYTHONPATH': str(ROOT)}


def final_error(workdir) -> float:
    """The last eval/top1 of metrics.jsonl as error %, read without the results module."""
    lines = [json.loads(line) for line in Path(workdir, 'metrics.jsonl').read_text().splitlines()]
    return 100 * (1 - [r for r in lines if 'eval/top1' in r][-1]['eval/top1'])


def sweep_options(spec, sweep_dir, **kw):
    """What `python -m resnet_jax.sweep --config=spec --sweep_dir=... --launcher=local` parses into."""
    return launch_options(config=spec, sweep_dir=str(sweep_dir), launcher='local', only=None, check_data=True, **kw)


@pytest.mark.slow
def test_tiny_sweep_launch_skip_resume_and_table(tmp_path, monkeypatch, capsys):
    """The command line launches 3 tiny runs (2 seeds of ResNet-8, 1 plain-8) with the local launcher;
    launching again (in this process) skips the finished runs and resumes one that lost its last
    checkpoint; the table's mean ± std are those of the runs' metric files."""
    spec, sweep_dir = write_experiment(tmp_path), tmp_path / 'sw'
    with pytest.raises(SweepError, match=r"run resnet20,name=adam: config.optim.name: name='adam' is not allowed"):
        sweep.run_sweep(sweep_options(f'{spec}:bad', sweep_dir))
    assert sweep.run_sweep(sweep_options(spec, sweep_dir, dry_run=True)) == 0
    commands = [line for line in capsys.readouterr().out.splitlines() if ' -m resnet_jax.train ' in line]
    assert len(commands) == 3
    assert commands[2].endswith(f'--config.optim.lr=0.05 >> {sweep_dir}/plain20,lr=0.05/train.log 2>&1')
    assert not sweep_dir.exists()  # refused, or dry: nothing written, nothing started

    first = run_module(['-m', 'resnet_jax.sweep', f'--config={spec}', f'--sweep_dir={sweep_dir}', '--local_parallel=2'],
                       env=cli_env(tmp_path))
    assert first.returncode == 0, first.stderr[-3000:]
    assert '3 of 3 runs finished; 0 unfinished' in first.stdout
    definition, runs = sweep.load(str(sweep_dir))
    for run in runs:
        assert sweep.run_state(run.workdir) == 'finished'
        recorded = json.loads(Path(run.workdir, 'config.json').read_text())
        assert recorded == json.loads(config_lib.to_json(sweep.resolve(run)))  # the command gave the sweep's config
    assert json.loads(Path(runs[2].workdir, 'config.json').read_text())['optim']['lr'] == 0.05

    # Run 1 loses its last checkpoint and its done marker: launching again resumes it from step 4
    # and leaves the finished runs alone.
    resumed = runs[1].workdir
    shutil.rmtree(os.path.join(resumed, 'checkpoints', '8'))
    os.remove(os.path.join(resumed, 'done.json'))
    before = {r.name: (os.stat(os.path.join(r.workdir, 'train.log')).st_mtime_ns,
                       Path(r.workdir, 'metrics.jsonl').read_text()) for r in runs}
    for key, value in cli_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    assert sweep.run_sweep(sweep_options(spec, sweep_dir)) == 0
    out = capsys.readouterr().out
    assert re.search(r'resnet20,seed=0 +finished\n +resnet20,seed=1 +unfinished\n +plain20,lr=0.05 +finished', out)
    assert '1 of 1 runs finished' in out
    for run in (runs[0], runs[2]):
        log, metrics = os.path.join(run.workdir, 'train.log'), Path(run.workdir, 'metrics.jsonl')
        assert (os.stat(log).st_mtime_ns, metrics.read_text()) == before[run.name]
    starts = [r['step'] for r in map(json.loads, Path(resumed, 'metrics.jsonl').read_text().splitlines())
              if 'perf/compile_seconds' in r]
    assert starts == [0, 4] and sweep.run_state(resumed) == 'finished'

    text = results.report(str(sweep_dir), ['eval/top1'])
    assert (sweep_dir / 'results.md').read_text() == text
    lines = text.splitlines()
    # No held-out split in these runs: the final test error only, nothing selected on the test split.
    assert lines[2] == '| config | optim.lr | runs | eval/top1 error % (final) | steps | state |'
    errors = [final_error(r.workdir) for r in runs]
    mean, std = np.mean(errors[:2]), np.std(errors[:2], ddof=1)
    assert lines[4].startswith(f'| resnet20 | – | 2 | {mean:.2f} ± {std:.2f} | ')
    assert lines[4].endswith(' | 8 | finished |')
    assert lines[5].startswith(f'| plain20 | 0.05 | 1 | {errors[2]:.2f} | ')
    rows = list(csv.DictReader(open(sweep_dir / 'results.csv')))
    assert [r['arg'] for r in rows] == ['resnet20', 'plain20'] and rows[0]['runs'] == '2'
    assert float(rows[0]['eval/top1 error % (final) mean']) == pytest.approx(mean, rel=1e-5)
    assert float(rows[0]['eval/top1 error % (final) std']) == pytest.approx(std, rel=1e-5, abs=1e-9)
    assert (sweep_dir / 'curves.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    records = results.collect(str(sweep_dir))
    assert [r['name'] for r in records] == [r.name for r in runs] and all(r['step'] == 8 for r in records)
    with pytest.raises(ValueError, match='no run logged eval/top2; the runs logged: .*eval/top1'):
        results.report(str(sweep_dir), ['eval/top2'])
