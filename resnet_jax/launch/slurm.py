"""The SLURM launcher: a sweep as one job array, one training as one multi-task job, requeued on pre-emption.

    python -m resnet_jax.sweep --config=experiments/cifar10.py --sweep_dir=runs/table6 --launcher=slurm \\
        --slurm_profile=launch/profiles/example.toml --slurm_time=4:00:00 [--slurm_wait] [--dry_run]
    python -m resnet_jax.launch.slurm --config=experiments/imagenet.py:resnet50 --workdir=runs/r50 \\
        --nodes=2 --gpus_per_node=8 --slurm_partition=gpu --slurm_time=24:00:00 [--config.a.b=v ...]

Both write a job script that a user can read and submit by hand (`sbatch <script>`) and submit it
with sbatch. Each training runs under `srun`, one task per GPU in a multi-task job, so that
`jax.distributed` reads SLURM's environment (process count, id and the coordinator's host) and
each process takes the GPU of its SLURM_LOCALID; every task therefore sees all its node's GPUs
(`--gpus-per-node`, not a per-task binding that would hide the GPU JAX asks for).

Pre-emption: the job asks SLURM for SIGTERM `signal_seconds` before its time limit
(`--signal=TERM@s`, which signals the job steps, i.e. the training processes, and not the
batch shell). Training saves and exits 75; the script then requeues the job (an array task
by `<array id>_<task id>`: the array's own id would requeue every task of the array), and
the requeued job resumes from the checkpoint. `scancel --signal=TERM <job>` does the same by
hand. SLURM holds a requeued job back for about two minutes before it may start again.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
import tomllib

from absl import flags

from resnet_jax import cli
from resnet_jax.launch.command import (
    LaunchError,
    config_args,
    define_training_flags,
    validate,
)
from resnet_jax.workdir import PREEMPTED_EXIT_CODE

# Every resource a profile may set, by the kind of its value, with its help; each is also the flag --slurm_<key>,
# which wins over the profile.
RESOURCES = {
    str: {
        'partition': 'partition (sbatch --partition)',
        'account': 'account to charge (sbatch --account)',
        'qos': 'quality of service (sbatch --qos)',
        'time': 'time limit per job or array task: minutes, [H]H:MM:SS or D-HH[:MM[:SS]]',
        'mem': 'memory per node, e.g. 64G (sbatch --mem)',
        'setup': 'shell lines run before the training, e.g. "module load cuda"',
        'python': f'interpreter on the compute nodes (default: this one, {sys.executable})',
    },
    int: {
        'gpus_per_task': 'GPUs of each sweep run (one task); a single training uses --gpus_per_node',
        'cpus_per_task': 'CPU cores per task (data loading)',
        'max_parallel': 'array tasks running at once (--array=...%N)',
        'signal_seconds': 'SIGTERM this many seconds before the time limit, for the save (default 120)',
    },
    list: {
        'sbatch_args': 'another sbatch option, written as an #SBATCH line (repeat the flag for several), '
                       'e.g. --constraint=a100',
    },
}
DEFINE = {str: flags.DEFINE_string, int: flags.DEFINE_integer, list: flags.DEFINE_multi_string}
RESOURCE_FLAGS = {key: DEFINE[kind](f'slurm_{key}', None, help_text)
                  for kind, helps in RESOURCES.items() for key, help_text in helps.items()}
KINDS = {key: kind for kind, helps in RESOURCES.items() for key in helps}
flags.DEFINE_bool('slurm_wait', False, 'block until the job ends; exit 1 unless every task completed')
flags.DEFINE_float('slurm_poll_seconds', 30.0, 'with --slurm_wait: seconds between queue checks')
flags.DEFINE_string('slurm_profile', None, 'TOML file of cluster defaults (keys: '
                    f'{", ".join(RESOURCE_FLAGS)}); flags win over it')

DEFAULT_SIGNAL_SECONDS = 120
TERMINAL_STATES = {'COMPLETED', 'FAILED', 'CANCELLED', 'TIMEOUT', 'NODE_FAIL', 'PREEMPTED', 'BOOT_FAIL', 'DEADLINE',
                   'OUT_OF_MEMORY'}
SCRIPT_DIR = 'slurm'  # in the sweep directory or the single run's workdir
KIND_NAMES = {str: 'a string', int: 'an integer', list: 'a list of strings'}
TIME_FORMAT = re.compile(r'^(?:(\d+)-(\d+)(?::(\d+)(?::(\d+))?)?|(\d+)(?::(\d+)(?::(\d+))?)?)$')


# --- resources ----------------------------------------------------------------------------------

def read_profile(path: str) -> dict:
    """A cluster profile: a TOML table of RESOURCE_FLAGS keys, checked for unknown keys and types."""
    try:
        with open(path, 'rb') as f:
            profile = tomllib.load(f)
    except OSError as e:
        raise LaunchError(f'--slurm_profile={path}: {e.strerror}') from None
    except tomllib.TOMLDecodeError as e:
        raise LaunchError(f'--slurm_profile={path} is not valid TOML: {e}') from None
    unknown = sorted(set(profile) - set(RESOURCE_FLAGS))
    if unknown:
        raise LaunchError(f'{path}: unknown key {unknown[0]!r}; the allowed keys are {", ".join(RESOURCE_FLAGS)}')
    for key, value in profile.items():
        kind = KINDS[key]
        if (not isinstance(value, kind) or isinstance(value, bool)
                or kind is list and not all(isinstance(v, str) for v in value)):
            raise LaunchError(f'{path}: {key} = {value!r} should be {KIND_NAMES[kind]}')
    return profile


def resources(options) -> dict:
    """{key: value} for every RESOURCE_FLAGS key that a flag or the profile sets (flags win), checked."""
    profile_path = getattr(options, 'slurm_profile', None)
    chosen = read_profile(profile_path) if profile_path else {}
    for key in RESOURCE_FLAGS:
        value = getattr(options, f'slurm_{key}', None)
        if value not in (None, []):
            chosen[key] = value
    chosen.setdefault('signal_seconds', DEFAULT_SIGNAL_SECONDS)
    chosen.setdefault('python', sys.executable)
    for key in ('gpus_per_task', 'cpus_per_task', 'max_parallel'):
        if key in chosen and chosen[key] < (0 if key == 'gpus_per_task' else 1):
            raise LaunchError(f'slurm_{key}={chosen[key]} must be at least {0 if key == "gpus_per_task" else 1}')
    if 'mem' in chosen and not re.fullmatch(r'\d+[KMGT]?', str(chosen['mem'])):
        raise LaunchError(f"slurm_mem={chosen['mem']!r}: use a number of megabytes or one with a K, M, G or T suffix")
    if chosen['signal_seconds'] < 0:
        raise LaunchError(f"slurm_signal_seconds={chosen['signal_seconds']} must be >= 0 (0: no warning signal)")
    if 'time' in chosen:
        limit = time_limit_seconds(str(chosen['time']))
        if chosen['signal_seconds'] >= limit:
            raise LaunchError(f"slurm_signal_seconds={chosen['signal_seconds']} leaves no training time in the time "
                              f"limit {chosen['time']} ({limit} s)")
    for arg in chosen.get('sbatch_args', []):
        if not arg.startswith('-'):
            raise LaunchError(f'slurm_sbatch_args: {arg!r} is not an sbatch option (--name=value)')
    return chosen


def time_limit_seconds(text: str) -> int:
    """Seconds in a SLURM time limit ('90' minutes, 'MM:SS', 'H:MM:SS', 'D-HH', 'D-HH:MM', 'D-HH:MM:SS')."""
    m = TIME_FORMAT.match(text.strip())
    if not m:
        raise LaunchError(f'slurm_time={text!r} is not a SLURM time limit; use minutes, MM:SS, H:MM:SS, D-HH, '
                          'D-HH:MM or D-HH:MM:SS')
    d, dh, dm, ds, a, b, c = (int(x) if x else 0 for x in m.groups())
    if m.group(1) is not None:
        return ((d * 24 + dh) * 60 + dm) * 60 + ds
    if m.group(7) is not None:  # H:MM:SS
        return (a * 60 + b) * 60 + c
    return a * 60 + b  # minutes, or MM:SS


# --- job scripts --------------------------------------------------------------------------------

def _header(lines: list[str], name: str, output: str, res: dict) -> list[str]:
    sbatch = [f'--job-name={name}', f'--output={output}', '--open-mode=append', '--requeue', *lines]
    if res['signal_seconds']:
        sbatch.append(f"--signal=TERM@{res['signal_seconds']}")
    sbatch.append(f'--chdir={os.getcwd()}')
    for key in ('partition', 'account', 'qos', 'time', 'cpus_per_task', 'mem'):
        if key in res:
            sbatch.append(f"--{key.replace('_', '-')}={res[key]}")
    sbatch += res.get('sbatch_args', [])
    # sbatch reads #SBATCH lines with shell-like quoting: a path with spaces or '#' stays one option.
    return [f'#SBATCH {shlex.quote(s)}' for s in sbatch]


def _body(describe: str, train: list[str], res: dict) -> list[str]:
    return [
        'set -uo pipefail',
        '# SIGTERM reaches this shell only when the job is cancelled (scancel <job>, the time limit, the',
        '# scheduler): the warning signal (--signal, scancel --signal) reaches the training only. Then wait',
        '# for the training to save, and do not requeue. (A handler: an ignored signal srun would inherit.)',
        'cancelled=0',
        "trap 'cancelled=1; echo \"[resnet_jax] the job is cancelled; waiting for the training to save\"' TERM",
        *([res['setup'].strip()] if res.get('setup') else []),
        *describe.splitlines(),
        'echo "[resnet_jax] $(date -Is) job $JOB, attempt $((${SLURM_RESTART_COUNT:-0} + 1)): $*"',
        ' '.join(train),
        'status=$?',
        'echo "[resnet_jax] $(date -Is) training exited with $status"',
        f'if [ "$status" -eq {PREEMPTED_EXIT_CODE} ] && [ "$cancelled" -eq 0 ]; then',
        '    # Saved on SIGTERM (--signal before the time limit, or scancel --signal=TERM): requeue this job',
        '    # (an array task by its own id: the array id would requeue every task), which then resumes.',
        '    echo "[resnet_jax] pre-empted after saving; requeueing $JOB"',
        '    scontrol requeue "$JOB"',
        'fi',
        'exit "$status"',
    ]


def _literal(path: str) -> str:
    """`path` in an sbatch --output pattern, where '%' starts a replacement ('%%' is a '%')."""
    return path.replace('%', '%%')


def sweep_script(num_runs: int, runs_file: str, sweep_dir: str, res: dict) -> str:
    """The job-array script: task i runs line i + 1 of `runs_file` (shell-quoted arguments) as one task."""
    array = f'0-{num_runs - 1}' + (f"%{res['max_parallel']}" if 'max_parallel' in res else '')
    lines = [f'--array={array}', '--ntasks=1']
    if res.get('gpus_per_task'):
        lines.append(f"--gpus-per-task={res['gpus_per_task']}")
    head = [
        '#!/bin/bash',
        f'# The sweep in {sweep_dir}: {num_runs} runs as one job array, written by resnet_jax.launch.slurm.',
        f'# Array task i runs line i + 1 of {runs_file} after the interpreter. To submit by hand: sbatch <this file>',
        *_header(lines, os.path.basename(sweep_dir.rstrip('/')) or 'sweep',
                 os.path.join(_literal(sweep_dir), SCRIPT_DIR, '%A_%a.out'), res),
    ]
    describe = ('JOB="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"\n'
                f'eval "set -- $(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {shlex.quote(runs_file)})"')
    train = ['srun', shlex.quote(res['python']), '"$@"']
    return '\n'.join(head + _body(describe, train, res)) + '\n'


def job_script(train_args: list[str], workdir: str, nodes: int, tasks_per_node: int, gpus_per_node: int,
               res: dict) -> str:
    """One training as `nodes` x `tasks_per_node` tasks under srun (one per GPU when there are GPUs)."""
    lines = [f'--nodes={nodes}', f'--ntasks-per-node={tasks_per_node}']
    if gpus_per_node:
        lines.append(f'--gpus-per-node={gpus_per_node}')
    head = [
        '#!/bin/bash',
        f'# The training in {workdir}: {nodes} node(s) x {tasks_per_node} task(s), written by '
        'resnet_jax.launch.slurm.',
        '# To submit by hand: sbatch <this file>',
        *_header(lines, os.path.basename(workdir.rstrip('/')), os.path.join(_literal(workdir), SCRIPT_DIR, '%j.out'),
                 res),
    ]
    describe = f'JOB="$SLURM_JOB_ID"\nset -- {shlex.join([res["python"], *train_args])}'
    train = ['srun', '--label', '"$@"']
    return '\n'.join(head + _body(describe, train, res)) + '\n'


# --- submitting and waiting ---------------------------------------------------------------------

def _next_path(directory: str, stem: str, suffix: str) -> str:
    """`<directory>/<stem>-<k><suffix>` with the first unused k."""
    k = 0
    while os.path.exists(os.path.join(directory, f'{stem}-{k}{suffix}')):
        k += 1
    return os.path.join(directory, f'{stem}-{k}{suffix}')


def submit(script_path: str) -> str:
    """sbatch the script; its job id."""
    try:
        out = subprocess.run(['sbatch', '--parsable', script_path], capture_output=True, text=True)
    except FileNotFoundError:
        raise LaunchError('sbatch is not on PATH: run this on a SLURM login node, or pass --dry_run') from None
    if out.returncode:
        raise LaunchError(f'sbatch {script_path} failed ({out.returncode}): {out.stderr.strip()}')
    return out.stdout.strip().split(';')[0]


def job_states(job_id: str) -> dict[str, tuple[str, str]]:
    """{task id: (state, exit code)} of a job or every task of a job array (scontrol, else sacct)."""
    out = subprocess.run(['scontrol', 'show', 'job', '-o', job_id], capture_output=True, text=True)
    if out.returncode == 0:
        states = {}
        for line in out.stdout.splitlines():
            fields = dict(f.split('=', 1) for f in line.split() if '=' in f)
            if 'JobState' not in fields:
                continue
            task = (f"{fields['ArrayJobId']}_{fields['ArrayTaskId']}" if fields.get('ArrayTaskId')
                    else fields['JobId'])
            states[task] = (fields['JobState'], fields.get('ExitCode', ''))
        return states
    # Gone from slurmctld's memory (MinJobAge): ask the accounting database.
    acct = subprocess.run(['sacct', '-X', '-n', '-P', '-o', 'JobID,State,ExitCode', '-j', job_id],
                          capture_output=True, text=True)
    if acct.returncode or not acct.stdout.strip():
        raise LaunchError(f'job {job_id} is unknown to scontrol ({out.stderr.strip()}) and to sacct '
                          f'({acct.stderr.strip() or "no record"})')
    rows = [line.split('|') for line in acct.stdout.splitlines() if line]
    return {row[0]: (row[1].split()[0], row[2]) for row in rows}


def wait(job_id: str, poll_seconds: float, logs: str) -> int:
    """Poll until every task of the job has ended; print state changes; 0 if all COMPLETED, else 1."""
    seen: dict = {}
    while True:
        states = job_states(job_id)
        for task, state in sorted(states.items()):
            if seen.get(task) != state:
                print(f'job {task}: {state[0]}', flush=True)
        seen = states
        if states and all(state in TERMINAL_STATES for state, _ in states.values()):
            break
        time.sleep(poll_seconds)
    bad = {task: s for task, s in states.items() if s[0] != 'COMPLETED'}
    print(f'job {job_id} ended: {len(states) - len(bad)} of {len(states)} tasks completed' +
          ''.join(f'; {task} {state} (exit {code})' for task, (state, code) in sorted(bad.items())) +
          f'. Logs: {logs}', flush=True)
    return 1 if bad else 0


def _write(path: str, text: str, mode: int = 0o644) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        f.write(text)
    os.chmod(path, mode)


def launch(runs, sweep_dir: str, options) -> int:
    """Submit `runs` (sweep RunSpecs) as one job array; with --slurm_wait, wait for it. An exit code."""
    try:
        res = resources(options)
        directory = os.path.join(sweep_dir, SCRIPT_DIR)
        script_path = _next_path(directory, 'array', '.sbatch')
        runs_path = script_path[:-len('.sbatch')] + '.runs'  # read when each task starts, so one per submission
        runs_text = ''.join(shlex.join(run.train_args()) + '\n' for run in runs)
        script = sweep_script(len(runs), runs_path, sweep_dir, res)
        if getattr(options, 'dry_run', False):
            print(f'# would write {runs_path}:\n{runs_text}# would write {script_path}:\n{script}'
                  f'# and run: sbatch {script_path}')
            return 0
        _write(runs_path, runs_text)
        _write(script_path, script, 0o755)
        job_id = submit(script_path)
        logs = os.path.join(directory, f'{job_id}_<task>.out')
        print(f'submitted job array {job_id}: {len(runs)} runs (task i = line i + 1 of {runs_path}); logs {logs}',
              flush=True)
        if getattr(options, 'slurm_wait', False):
            return wait(job_id, getattr(options, 'slurm_poll_seconds', 30.0), logs)
        return 0
    except LaunchError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2


# --- python -m resnet_jax.launch.slurm: one training as one job ---------------------------------

def main(argv) -> int:
    """`python -m resnet_jax.launch.slurm`: check the job's shape and config, write its script and submit it
    (printed only with --dry_run)."""
    options = flags.FLAGS
    if len(argv) > 1:
        raise LaunchError(f'unexpected arguments: {argv[1:]}')
    nodes, gpus = options.nodes, options.gpus_per_node
    tasks = options.tasks_per_node if options.tasks_per_node is not None else gpus
    if nodes < 1:
        raise LaunchError(f'--nodes={nodes} must be at least 1')
    if gpus < 0:
        raise LaunchError(f'--gpus_per_node={gpus} must be >= 0')
    if tasks < 1:
        raise LaunchError('--tasks_per_node must be at least 1; without GPUs (--gpus_per_node=0) give it, e.g. '
                          '--tasks_per_node=2')
    if gpus and tasks != gpus:
        raise LaunchError(f'--tasks_per_node={tasks} with --gpus_per_node={gpus}: the job runs one process per GPU '
                          '(jax.distributed gives task i of a node its GPU SLURM_LOCALID), so they must be equal')
    res = resources(options)
    if 'gpus_per_task' in res:
        raise LaunchError('--slurm_gpus_per_task is for sweep runs; a single training takes --gpus_per_node')
    validate(options.config, nodes * tasks)  # a bad config fails here, not in the queue
    workdir = os.path.abspath(options.workdir)
    train_args = ['-m', 'resnet_jax.train', *config_args(sys.argv), f'--workdir={workdir}']
    script = job_script(train_args, workdir, nodes, tasks, gpus, res)
    script_path = os.path.join(workdir, SCRIPT_DIR, 'train.sbatch')
    if options.dry_run:
        print(f'# would write {script_path}:\n{script}# and run: sbatch {script_path}')
        return 0
    _write(script_path, script, 0o755)
    job_id = submit(script_path)
    logs = os.path.join(workdir, SCRIPT_DIR, f'{job_id}.out')
    print(f'submitted job {job_id}: {nodes} node(s) x {tasks} task(s); log {logs}', flush=True)
    return wait(job_id, options.slurm_poll_seconds, logs) if options.slurm_wait else 0


def _define_job_flags() -> None:
    define_training_flags()
    flags.DEFINE_integer('nodes', 1, 'nodes')
    flags.DEFINE_integer('gpus_per_node', 0, 'GPUs per node; one task (process) per GPU')
    flags.DEFINE_integer('tasks_per_node', None, 'processes per node (default: --gpus_per_node; needed without GPUs)')
    flags.mark_flags_as_required(['config', 'workdir'])


if __name__ == '__main__':
    _define_job_flags()
    cli.run(main, config_flag='config')
