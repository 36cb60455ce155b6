"""python -m resnet_jax.bench: training throughput, step time, compile time, MFU and memory.

    python -m resnet_jax.bench --model=resnet50 --batch_size=256 --dtype=bfloat16 --vs_torch
    python -m resnet_jax.bench --model=resnet20,resnet56 --batch_size=128,1024 --source=device
    python -m resnet_jax.bench --model=resnet50 --dtype=bfloat16 --remat=false,true --max_batch
    python -m resnet_jax.bench --model=resnet20 --batch_size=128 --population=1,2,4,8,16

Every combination of the comma-separated flags is one row. The step timed is the training
step `python -m resnet_jax.train` runs (forward, backward, SGD with momentum and weight
decay, BatchNorm statistics), built by the same `Run` from a config. Sources:
  synthetic  one random batch placed on the device once; no host work at all
  device     a random (or --dataset) set of --num_examples images resident on the device,
             shuffled and augmented inside the step (data.feed='device')
  host       the same set in host memory, gathered and transferred each step (data.feed='host')
--population=M,... times populations of M runs (resnet_jax.train.population), vmapped and as a loop
inside one jit, beside M separate runs of the single step.
Each measurement (our step, PyTorch eager, PyTorch compiled) runs in a fresh process, so
one framework's memory pool or compile cache never affects another's numbers, and each
reports its own peak memory. Step time is measured over windows of --window steps with one
device synchronisation per window; the median and the 10th/90th percentiles are over windows.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import statistics
import time

import jax
import numpy as np

from resnet_jax import sharding
from resnet_jax.data import arrays, sources
from resnet_jax.errors import UserError
from resnet_jax.models import get_model, onednn
from resnet_jax.models.registry import native_resolution
from resnet_jax.models.torchvision_import import from_torchvision
from resnet_jax.train import mfu
from resnet_jax.train.config import base_config
from resnet_jax.train.population import Population
from resnet_jax.train.run import Run


class BenchError(UserError, ValueError):
    """A bad benchmark request; the message names the flag and what is allowed."""


def _config(model: str, batch: int, dtype: str, source: str, remat: bool, image_size: int | None,
            num_examples: int, dataset: str, peak_tflops: float | None):
    """The training config whose step a row measures."""
    c = base_config()
    c.model.name = model
    c.model.dtype = dtype
    c.model.remat = remat
    c.batch_size = batch
    c.eval.batch_size = batch
    c.num_steps = 1
    preset = get_model(model)
    c.model.num_classes = preset.num_classes  # 1000 for ImageNet nets: the synthetic set follows it
    size = image_size or native_resolution(preset)
    c.data.image_size = size
    c.data.augment = 'cifar' if source != 'synthetic' and size <= 64 else 'none'
    c.data.feed = 'device' if source == 'device' else 'host'
    # The synthetic source needs just one batch; the others a dataset to draw from.
    c.data.dataset = 'synthetic' if source == 'synthetic' else dataset
    c.data.num_train = batch if source == 'synthetic' else num_examples
    c.data.num_eval = batch
    c.log.peak_tflops_per_device = peak_tflops
    return c


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _memory_gib(compiled) -> float | None:
    """The compiled step's device footprint: arguments + outputs - donated aliases + temporaries."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    total = (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
             + stats.temp_size_in_bytes)
    return total / 2 ** 30


def _device_memory_gib(stat: str) -> float | None:
    """A statistic of the first device's allocator ('peak_bytes_in_use', 'bytes_limit'), if it keeps one."""
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats[stat] / 2 ** 30 if stat in stats else None


def measure_jax(config, steps: int, warmup: int, window: int, torch_weights=None, step: str = 'train') -> dict:
    """Compile and time our `step` ('train' or 'eval') for `config`; optionally from converted torch weights.
    The eval step is the one `evaluate` runs, on the training split's first batch (all of it real)."""
    run = Run(config)
    state = run.initial_state()
    if torch_weights is not None:
        variables = from_torchvision(torch_weights, run.model)
        state = jax.device_put(state.replace(params=variables['params'], batch_stats=variables['batch_stats'],
                                             opt_state=run.optimizer.init(variables['params'])),
                               run.state_sharding)
    t0 = time.perf_counter()
    if step == 'train':
        if config.data.dataset == 'synthetic':  # random images: the same input every step, so no host work
            next_input = run.feed.fixed_inputs(run.train_data)
        else:
            next_input = run.train_inputs(0)[1]
        rng = jax.random.key(config.seed)
        compiled = run.train_step.lower(state, next_input(), rng).compile()
        advance = lambda s: compiled(s, next_input(), rng)  # noqa: E731
        mean_loss = lambda metrics: metrics['train/loss']  # noqa: E731
    else:
        first = next(iter(arrays.eval_batches(run.train_data, config.eval.batch_size, jax.process_index(),
                                              jax.process_count())))
        batch = sharding.global_batch(first, run.mesh)
        compiled = run.eval_step.lower(state, batch, False).compile()
        advance = lambda s: (s, compiled(s, batch))  # noqa: E731
        mean_loss = lambda sums: sums['loss'] / sums['count']  # noqa: E731
    compile_seconds = time.perf_counter() - t0
    flops = mfu.model_flops(run.model, config.data.image_size, config.batch_size, step == 'train') / run.mesh.size

    first_loss = None
    for i in range(warmup):
        state, metrics = advance(state)
        if i == 0:
            first_loss = float(mean_loss(metrics))
    jax.block_until_ready(state)
    state, metrics, per_step = _window_times(advance, state, steps, window)
    if not np.isfinite(float(mean_loss(metrics))):
        raise FloatingPointError(f'the loss became {float(mean_loss(metrics))} while timing')

    median = statistics.median(per_step)
    devices = run.mesh.size
    peak = mfu.peak_flops_per_device(config)
    return {'images_per_sec': config.batch_size / median,
            'images_per_sec_per_device': config.batch_size / median / devices,
            'step_ms_median': 1e3 * median, 'step_ms_p10': 1e3 * _percentile(per_step, 0.1),
            'step_ms_p90': 1e3 * _percentile(per_step, 0.9), 'compile_seconds': compile_seconds,
            'tflop_per_step_per_device': flops / 1e12,
            'mfu': mfu.mfu(flops, median, peak),
            'memory_gib': _memory_gib(compiled), 'device_peak_gib': _device_memory_gib('peak_bytes_in_use'),
            'device_limit_gib': _device_memory_gib('bytes_limit'), 'first_loss': first_loss,
            'device_kind': jax.devices()[0].device_kind, 'num_devices': devices,
            'xla_flags': os.environ.get('XLA_FLAGS', ''), 'cpu_kernels': _cpu_kernels()}


def _cpu_kernels() -> str | None:
    """On CPU, whose conv kernels the step ran: 'oneDNN', or 'XLA: <why not oneDNN>'."""
    if jax.default_backend() != 'cpu':
        return None
    if onednn.applies():
        return 'oneDNN'
    return 'XLA: ' + (onednn.why_not() or f'{jax.device_count()} devices (oneDNN runs with one)')


def _window_times(step, state, steps: int, window: int):
    """(state, metrics, seconds per step of each window): `step(state) -> (state, metrics)` run in windows of
    `window` steps, with one device synchronisation per window."""
    per_step = []
    for _ in range(max(1, steps // window)):
        t0 = time.perf_counter()
        for _ in range(window):
            state, metrics = step(state)
        jax.block_until_ready((state, metrics))
        per_step.append((time.perf_counter() - t0) / window)
    return state, metrics, per_step


def measure_population(config, size: int, steps: int, warmup: int, window: int) -> dict:
    """Time a population of `size` copies of `config` (seeds 0..size-1) on one fixed device-resident batch
    per member, trained by the vmapped step and by a Python loop over the members inside one jit:
    {'vmap': {...}, 'loop': {...}} with member-images/s, step time, compile time and memory."""
    configs = [config.copy_and_resolve_references() for _ in range(size)]
    for seed, c in enumerate(configs):
        c.seed = seed
    population = Population(configs)
    batches, rngs, values = population.train_inputs()(), population.rngs(), population.device_values()
    out = {}
    for mode, step in (('vmap', population.vmap_step), ('loop', population.loop_step)):
        state = population.initial_states()
        t0 = time.perf_counter()
        compiled = step.lower(state, batches, rngs, values).compile()
        compile_seconds = time.perf_counter() - t0
        run = lambda s: compiled(s, batches, rngs, values)  # noqa: E731
        for _ in range(warmup):
            state, _ = run(state)
        state, metrics, per_step = _window_times(run, state, steps, window)
        median = statistics.median(per_step)
        out[mode] = {'member_images_per_sec': size * config.batch_size / median, 'step_ms_median': 1e3 * median,
                     'compile_seconds': compile_seconds, 'memory_gib': _memory_gib(compiled),
                     'final_loss': [float(v) for v in jax.device_get(metrics['train/loss'])]}
        del state
    out['device_kind'], out['num_devices'] = jax.devices()[0].device_kind, jax.device_count()
    return out


def population_rows(spec: dict, sizes: list[int], args: dict) -> list[dict]:
    """One row per population size: the population's vmap and loop-in-jit numbers beside `size` separate
    single runs (the single run's step, measured once, taken `size` times one after another)."""
    config = _config(spec['model'], spec['batch'], spec['dtype'], 'synthetic', spec['remat'], args['image_size'],
                     args['num_examples'], args['dataset'], args['peak_tflops'])
    single = _in_fresh_process(measure_jax, config, args['steps'], args['warmup'], args['window'])
    rows = []
    for size in sizes:
        row = dict(spec, image_size=config.data.image_size, members=size,
                   separate={'member_images_per_sec': single['images_per_sec'],
                             'step_ms_median': size * single['step_ms_median'],
                             'memory_gib': None if single['memory_gib'] is None else size * single['memory_gib']})
        row.update(_in_fresh_process(measure_population, config, size, args['steps'], args['warmup'], args['window']))
        rows.append(row)
    return rows


def population_table(rows: list[dict]) -> str:
    """The population rows as a Markdown table: each mode's member-images/s, time per step of all M members,
    memory, and its speed relative to M separate runs."""
    head = ('| model | batch | dtype | device | M | mode | member img/s | ms per step of all M | memory GiB '
            '| vs separate |')
    lines = [head, '|' + '---|' * (head.count('|') - 1)]
    for r in rows:
        base = r['separate']['member_images_per_sec']
        for mode in ('separate', 'vmap', 'loop'):
            m = r[mode]
            lines.append(f"| {r['model']} | {r['batch']} | {r['dtype']} | {r['device_kind']} x{r['num_devices']} "
                         f"| {r['members']} | {mode} | {_fmt(m['member_images_per_sec'])} | {m['step_ms_median']:.1f} "
                         f"| {_fmt(m['memory_gib'], '.2f')} | {m['member_images_per_sec'] / base:.2f}x |")
    return '\n'.join(lines)


def _set_batch(config, batch: int) -> None:
    """Point a synthetic-source config at another batch size (one batch of data is all it needs)."""
    config.batch_size = config.eval.batch_size = config.data.num_train = config.data.num_eval = batch


def largest_batch(config, limit_gib: float | None = None, granularity: int = 32) -> dict:
    """The largest global batch (a multiple of `granularity`) whose step fits in device memory.

    The compiler's memory analysis of the step is affine in the batch size, so two compiles
    (at 128 and 256) predict the limit, and compiles at the prediction and its neighbours
    settle it without ever running out of memory. These compiles skip GPU autotuning, which
    changes speed, not size. The batch found then runs for real. `limit_gib` defaults to
    what the device's allocator may use (set XLA_PYTHON_CLIENT_MEM_FRACTION to raise it).
    """
    limit = limit_gib or _device_memory_gib('bytes_limit')
    if limit is None:
        raise BenchError('--max_batch needs --memory_limit_gib on a device that reports no memory limit (a CPU)')
    options = {'xla_gpu_autotune_level': 0} if jax.default_backend() == 'gpu' else {}
    sizes: dict[int, float] = {}

    def fits(batch: int) -> bool:
        if batch not in sizes:
            _set_batch(config, batch)
            run = Run(config)
            size, data = config.data.image_size, sharding.batch_sharding(run.mesh)
            abstract = {'image': jax.ShapeDtypeStruct((batch, size, size, 3), 'uint8', sharding=data),
                        'label': jax.ShapeDtypeStruct((batch,), 'int32', sharding=data)}
            lowered = run.train_step.lower(run.abstract_state, abstract, jax.random.key(0))
            sizes[batch] = _memory_gib(lowered.compile(compiler_options=options))
        return sizes[batch] <= limit

    fits(128), fits(256)
    per_example = (sizes[256] - sizes[128]) / 128
    batch = max(granularity, int((limit - sizes[128]) / per_example + 128) // granularity * granularity)
    while not fits(batch):
        if batch == granularity:
            return {'max_batch': 0, 'memory_gib': None, 'next_memory_gib': sizes[batch], 'device_limit_gib': limit,
                    'compiles': len(sizes), 'device_kind': jax.devices()[0].device_kind}
        batch -= granularity
    while fits(batch + granularity):
        batch += granularity
    _set_batch(config, batch)
    timed = measure_jax(config, steps=1, warmup=1, window=1)
    return {'max_batch': batch, 'memory_gib': sizes[batch], 'next_memory_gib': sizes[batch + granularity],
            'device_limit_gib': limit, 'device_peak_gib': timed['device_peak_gib'],
            'images_per_sec': timed['images_per_sec'], 'compiles': len(sizes), 'device_kind': timed['device_kind']}


def _torch_row(name: str, config, compile: bool, steps: int, warmup: int, seed: int, step: str) -> dict:
    """PyTorch's numbers for the same model, batch, precision and step, on the same first batch."""
    import torch

    from resnet_jax.pytorch import bench as bench_torch

    ds = sources.load(config, config.data.train_split)
    model = bench_torch.make_model(name, ds.num_classes, seed)
    mean, std = ds.channel_stats()
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    return bench_torch.measure(model, np.asarray(ds.images[:config.batch_size]),
                               np.asarray(ds.labels[:config.batch_size]), mean, std, dtype=config.model.dtype,
                               compile=compile, steps=steps, warmup=warmup, device=device, train=step == 'train')


def _torch_weights(name: str, num_classes: int, seed: int) -> dict:
    """The initial torch weights as numpy arrays, for our step to start from the same point."""
    from resnet_jax.pytorch import bench as bench_torch
    return {k: v.detach().cpu().numpy() for k, v in bench_torch.make_model(name, num_classes, seed).state_dict().items()}


def _in_fresh_process(fn, *args):
    """fn(*args) in a new process: separate memory pools, compile caches and peak-memory counters."""
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('spawn')) as pool:
        return pool.submit(fn, *args).result()


def _median_run(runs: list[dict]) -> dict:
    """The run with the median images/s (the lower middle one of an even number)."""
    return sorted(runs, key=lambda r: r['images_per_sec'])[(len(runs) - 1) // 2]


def measure_row(spec: dict, args: dict) -> dict:
    """One table row: our step (or the largest batch that fits) and, with vs_torch, PyTorch's, each
    measured in a fresh process. With repeat > 1 the measurements run that many times, ours and
    PyTorch's alternating, so that each ratio compares two runs minutes apart at most: the row gives
    the median runs, the median of the paired ratios, and every run's images/s and ratio ('*_all')."""
    config = _config(spec['model'], spec['batch'], spec['dtype'], spec['source'], spec['remat'],
                     args['image_size'], args['num_examples'], args['dataset'], args['peak_tflops'])
    row = dict(spec, image_size=config.data.image_size)
    if args['max_batch']:
        row.update(_in_fresh_process(largest_batch, config, args['memory_limit_gib']))
        return row
    weights = None
    if args['vs_torch']:
        weights = _in_fresh_process(_torch_weights, spec['model'], config.model.num_classes, 0)
    modes = (('eager', 'compile') if args['torch_compile'] else ('eager',)) if args['vs_torch'] else ()
    ours, theirs = [], {mode: [] for mode in modes}
    for _ in range(args['repeat']):
        ours.append(_in_fresh_process(measure_jax, config, args['steps'], args['warmup'], args['window'], weights,
                                      spec['step']))
        for mode in modes:
            theirs[mode].append(_in_fresh_process(_torch_row, spec['model'], config, mode == 'compile', args['steps'],
                                                  args['warmup'], 0, spec['step']))
    row.update(_median_run(ours), repeats=args['repeat'], images_per_sec_all=[r['images_per_sec'] for r in ours])
    row['projected_minutes'] = args['projected_steps'] * row['step_ms_median'] / 6e4 if spec['step'] == 'train' else None
    for mode, runs in theirs.items():
        ratios = [a['images_per_sec'] / b['images_per_sec'] for a, b in zip(ours, runs)]
        row[f'torch_{mode}'] = _median_run(runs)
        row[f'ratio_vs_torch_{mode}'] = statistics.median(ratios)
        row[f'ratio_vs_torch_{mode}_all'] = ratios
    return row


def _fmt(value, spec: str = '.0f') -> str:
    return '-' if value is None else format(value, spec)


def _ratio(row: dict, mode: str) -> str:
    """A ratio column: the ratio, and with repeated measurements the range of the paired ratios."""
    ratios = row.get(f'ratio_vs_torch_{mode}_all') or []
    spread = f' ({min(ratios):.2f}-{max(ratios):.2f})' if len(ratios) > 1 else ''
    return _fmt(row.get(f'ratio_vs_torch_{mode}'), '.2f') + spread


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table (the tables in docs/performance.md have these columns)."""
    if rows and 'max_batch' in rows[0]:
        head = '| model | dtype | remat | image | device | largest batch | memory GiB (limit) | img/s at it | compiles |'
        lines = [head, '|' + '---|' * (head.count('|') - 1)]
        for r in rows:
            lines.append(f"| {r['model']} | {r['dtype']} | {r['remat']} | {r['image_size']} | {r.get('device_kind', '-')} "
                         f"| {r['max_batch']} | {_fmt(r['memory_gib'], '.2f')} ({_fmt(r['device_limit_gib'], '.2f')}) "
                         f"| {_fmt(r.get('images_per_sec'))} | {r['compiles']} |")
        return '\n'.join(lines)
    head = ('| model | batch | dtype | source | step | remat | device | img/s | img/s/device | step ms (p10-p90) | '
            'compile s | MFU | memory GiB | torch eager img/s | torch compile img/s | ratio eager | ratio compile '
            '| first loss (ours / torch) | projected min |')
    lines = [head, '|' + '---|' * (head.count('|') - 1)]
    for r in rows:
        eager, compiled = r.get('torch_eager') or {}, r.get('torch_compile') or {}
        torch_loss = eager.get('first_loss')
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['dtype']} | {r['source']} | {r['step']} | {r['remat']} | {r['device_kind']} x{r['num_devices']}"
            f"{' (oneDNN)' if r.get('cpu_kernels') == 'oneDNN' else ''} | {_fmt(r['images_per_sec'])} | {_fmt(r['images_per_sec_per_device'])} "
            f"| {r['step_ms_median']:.2f} ({r['step_ms_p10']:.2f}-{r['step_ms_p90']:.2f}) | {r['compile_seconds']:.1f} "
            f"| {_fmt(r['mfu'], '.1%')} | {_fmt(r['memory_gib'], '.2f')} "
            f"| {_fmt(eager.get('images_per_sec'))} | {_fmt(compiled.get('images_per_sec'))} "
            f"| {_ratio(r, 'eager')} | {_ratio(r, 'compile')} "
            f"| {_fmt(r['first_loss'], '.4f')} / {_fmt(torch_loss, '.4f')} | {_fmt(r['projected_minutes'], '.1f')} |")
    return '\n'.join(lines)
