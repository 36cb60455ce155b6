"""Where the CPU training step's time goes (experiments/perf/CPU_NOTES.md): profile the compiled step
with jax.profiler and sum the op time by kind of op, with each convolution told apart as a forward or
input-gradient conv (its kernel is a 3x3-like window) or a weight-gradient conv (its "kernel" is the
output gradient, as large as the feature map), and its throughput in GFLOP/s.

    python experiments/perf/cpu_profile.py --model=resnet20
    python experiments/perf/cpu_profile.py --model=resnet50 --batch=32 --size=64

The op names come from XLA:CPU's thunk runtime (one trace event per thunk); the compiled HLO text maps a
fusion's name to its fused computation. Timings are of the step as the training loop compiles it.
"""
import argparse
import collections
import glob
import gzip
import json
import math
import re
import tempfile

import jax
from cpu_variants import _run

from resnet_jax import sharding

SHAPE = r'f32\[([\d,]+)\]'


def _trace(compiled, state, inputs, rng, steps: int) -> dict:
    """{op name: microseconds per step} over `steps` profiled steps (after three unprofiled ones)."""
    s = jax.tree.map(lambda v: v.copy(), state)  # the step donates its state
    for _ in range(3):
        s, _ = compiled(s, inputs, rng)
    jax.block_until_ready(s)
    directory = tempfile.mkdtemp()
    jax.profiler.start_trace(directory)
    for _ in range(steps):
        s, _ = compiled(s, inputs, rng)
    jax.block_until_ready(s)
    jax.profiler.stop_trace()
    trace = json.load(gzip.open(glob.glob(f'{directory}/**/*.trace.json.gz', recursive=True)[0]))
    total = collections.Counter()
    for event in trace['traceEvents']:
        name = event.get('name', '')
        if event.get('ph') == 'X' and not (name.startswith(('Thunk', '$', 'Pjit', 'end: ', 'Common', 'Slinky',
                                                            'ParseArguments'))):
            total[name] += event['dur'] / steps
    return total


def _convs(hlo: str) -> dict:
    """{op name: (kind, GFLOP)} for every convolution: a YNNPACK fusion holding one, or a conv that XLA
    runs itself (Eigen). The latter runs asynchronously: its trace event covers only its dispatch, and
    its time lands on the ops that wait for it, so its row gives no throughput."""
    calls = dict(re.findall(r'%([\w.\-]+) = [^\n]*? fusion\([^\n]*?calls=%([\w.\-]+)', hlo))
    bodies = {m[1]: m[2] for m in re.finditer(r'\n%?([\w.\-]+) \([^\n]*\{\n(.*?)\n\}', hlo, re.S)}
    shapes = dict(re.findall(rf'%([\w.\-]+) = {SHAPE}', hlo))  # instruction names are unique in a module
    pattern = rf'%([\w.\-]+) = {SHAPE}\S* convolution\(%([\w.\-]+), %([\w.\-]+)\)'
    fused = {re.search(pattern, bodies.get(computation, '')): fusion for fusion, computation in calls.items()}
    entry = hlo[hlo.index('\nENTRY'):]
    out = {}
    for conv in [*fused, *re.finditer(pattern, entry)]:
        if conv is None:
            continue
        result = [int(d) for d in conv[2].split(',')]
        rhs = [int(d) for d in shapes[conv[4]].split(',')]
        # Every output element sums (window x input features) products, 2 FLOPs each; a weight-gradient
        # conv's "kernel" is the output gradient, a feature map larger than any kernel window.
        flops = 2 * math.prod(result) * math.prod(rhs[:3])
        kind = 'conv dW' if rhs[1] > 7 else 'conv fwd/dX'
        out[fused.get(conv, conv[1])] = (kind if conv in fused else f'{kind}, Eigen (async)', flops / 1e9)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--model', default='resnet20')
    p.add_argument('--batch', type=int, default=128)
    p.add_argument('--size', type=int, default=32)
    p.add_argument('--steps', type=int, default=3, help='profiled steps')
    a = p.parse_args()
    run = _run(a.model, a.batch, a.size, True)
    state = run.initial_state()
    inputs = sharding.global_batch({'image': run.train_data.images[:a.batch],
                                    'label': run.train_data.labels[:a.batch]}, run.mesh)
    rng = jax.random.key(0)
    compiled = run.train_step.lower(state, inputs, rng).compile()
    hlo = compiled.as_text()
    times, convs = _trace(compiled, state, inputs, rng, a.steps), _convs(hlo)
    targets = dict(re.findall(r'%([\w.\-]+) = [^\n]*? custom-call\([^\n]*?custom_call_target="(\w+)"', hlo))
    kinds, counts, flops = collections.Counter(), collections.Counter(), collections.Counter()
    for name, us in times.items():
        kind = convs[name][0] if name in convs else targets.get(name, re.sub(r'\.\d+$', '', name))
        kinds[kind] += us
        counts[kind] += 1
        flops[kind] += convs[name][1] if name in convs else 0
    total = sum(kinds.values())
    print(f'{a.model}, batch {a.batch}, {a.size}x{a.size}: {total / 1e3:.1f} ms of op time per step')
    print('| kind of op | ms/step | share | ops | GFLOP/s |\n|---|---|---|---|---|')
    for kind, us in kinds.most_common(20):
        rate = f'{flops[kind] / (us / 1e6):.0f}' if flops[kind] and 'async' not in kind else ''
        print(f'| {kind} | {us / 1e3:.1f} | {100 * us / total:.1f}% | {counts[kind]} | {rate} |')


if __name__ == '__main__':
    main()
