"""oneDNN's convolution (forward, input and weight gradient) and BatchNorm backward on the CPU
backend, as XLA FFI custom calls (onednn_ops.cc), and beside them SGD's update of every parameter in one
in-place pass (`sgd_update`, used by train.optim).

XLA:CPU's own convolutions run at 80-105 GFLOP/s on a ResNet's shapes where oneDNN, the library
PyTorch uses, reaches 170-240 (experiments/perf/CPU_NOTES.md, entries 14 and 16); the convolutions
are two thirds of a CPU training step, and XLA's autodiff of BatchNorm makes several passes where
oneDNN's backward makes one (entry 18). So on CPU the models call oneDNN when it is there
(models/cpu_conv.py, the BatchNorm in models/resnet.py).

The kernel is compiled on first use with the system's C++ compiler against oneDNN's headers and
library (Debian/Ubuntu: `apt-get install libdnnl-dev`; or `ONEDNN_ROOT` naming an install prefix),
and kept in the user's cache directory under a name derived from everything that goes into it.
`RESNET_JAX_CPU_CONV` chooses: `auto` (the default: oneDNN when it builds, XLA's conv otherwise),
`onednn` (oneDNN or an error saying why not), `xla` (never oneDNN).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = Path(__file__).with_name('onednn_ops.cc')
CHOICES = ('auto', 'onednn', 'xla')
TARGETS = {'conv_forward': 'ResnetJaxOnednnConvForward', 'conv_input_grad': 'ResnetJaxOnednnConvInputGrad',
           'conv_weight_grad': 'ResnetJaxOnednnConvWeightGrad', 'norm_backward': 'ResnetJaxOnednnNormBackward',
           'sgd_update': 'ResnetJaxSgdUpdate'}


class Unavailable(RuntimeError):
    """oneDNN's conv was asked for (`RESNET_JAX_CPU_CONV=onednn`) and cannot be built or loaded."""


def choice() -> str:
    """RESNET_JAX_CPU_CONV's value, checked (see the module docstring)."""
    value = os.environ.get('RESNET_JAX_CPU_CONV', 'auto')
    if value not in CHOICES:
        raise ValueError(f'RESNET_JAX_CPU_CONV={value!r}: allowed values are {", ".join(CHOICES)}')
    return value


def _prefixes() -> list[Path]:
    given = os.environ.get('ONEDNN_ROOT')
    return [Path(given)] if given else [Path(sys.prefix), Path('/usr/local'), Path('/usr')]


def _find_onednn() -> tuple[Path, Path]:
    """(include dir, library dir) of a oneDNN install, or Unavailable naming where it looked."""
    for prefix in _prefixes():
        include = prefix / 'include'
        if not (include / 'oneapi' / 'dnnl' / 'dnnl.hpp').exists():
            continue
        for lib in (prefix / 'lib', prefix / 'lib64', prefix / 'lib' / 'x86_64-linux-gnu',
                    prefix / 'lib' / 'aarch64-linux-gnu'):
            if any(lib.glob('libdnnl.so*')):
                return include, lib
    raise Unavailable('oneDNN headers and library not found under ' + ', '.join(map(str, _prefixes()))
                      + ' (install libdnnl-dev, or set ONEDNN_ROOT to its install prefix)')


def _cache_dir() -> Path:
    return Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache') / 'resnet_jax'


def _build() -> Path:
    """The compiled kernel library, compiled now if no cached copy matches the source, the JAX
    version (its FFI headers), the oneDNN version and the compiler flags."""
    compiler = os.environ.get('CXX') or shutil.which('g++') or shutil.which('c++')
    if compiler is None:
        raise Unavailable('no C++ compiler found (install g++, or set CXX)')
    include, lib = _find_onednn()
    system = [] if include == Path('/usr/include') else ['-isystem', str(include)]  # already searched, and
    # naming it again reorders the C++ library's #include_next chain
    # No contraction into fused multiply-adds but the ones the SGD kernel asks for (XLA's, to the bit).
    command = [compiler, '-O2', '-ffp-contract=off', '-fopenmp', '-std=c++17', '-shared', '-fPIC',
               '-isystem', jax.ffi.include_dir(), *system, str(SOURCE), f'-L{lib}', f'-Wl,-rpath,{lib}', '-ldnnl']
    version = (include / 'oneapi' / 'dnnl' / 'dnnl_version.h').read_bytes()
    digest = hashlib.sha256(SOURCE.read_bytes() + version + jax.__version__.encode()
                            + ' '.join(command[1:]).encode()).hexdigest()[:16]
    target = _cache_dir() / f'onednn_ops-{digest}.so'
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        done = subprocess.run([*command, '-o', str(built)], capture_output=True, text=True)
        if done.returncode != 0:
            raise Unavailable(f'compiling {SOURCE.name} failed:\n{done.stderr[-2000:]}')
        os.replace(built, target)  # atomic: concurrent builders each install a complete file
    return target


@functools.cache
def _load() -> str | None:
    """Builds, loads and registers the kernels once per process: None, or why they are unavailable."""
    try:
        library = ctypes.CDLL(str(path := _build()))
        handlers = {name: getattr(library, symbol) for name, symbol in TARGETS.items()}
    except (Unavailable, OSError) as err:
        return str(err)
    except AttributeError as err:  # a library built from another version of the source
        return f'{path} lacks a kernel ({err}); delete it to rebuild'
    for name, handler in handlers.items():
        jax.ffi.register_ffi_target(f'resnet_jax_onednn_{name}', jax.ffi.pycapsule(handler), platform='cpu')
    return None


def enabled() -> bool:
    """Whether the CPU convs call oneDNN in this process (see the module docstring)."""
    wanted = choice()
    if wanted == 'xla':
        return False
    problem = _load()
    if problem is not None and wanted == 'onednn':
        raise Unavailable(f'RESNET_JAX_CPU_CONV=onednn but oneDNN cannot be used: {problem}')
    return problem is None


def applies() -> bool:
    """Whether the models call oneDNN now: on the CPU backend with one device in the process (a custom
    call has no partitioning rule, so a sharded step keeps XLA's ops), when `enabled`."""
    return jax.default_backend() == 'cpu' and jax.device_count() == 1 and enabled()


def why_not() -> str | None:
    """None when oneDNN's conv is in use, otherwise the reason (for the bench's report)."""
    if choice() == 'xla':
        return 'RESNET_JAX_CPU_CONV=xla'
    return _load()


def _call(name, out_shapes, *operands, aliases=None, **attributes):
    if (problem := _load()) is not None:
        raise Unavailable(problem)
    out = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in out_shapes]
    return jax.ffi.ffi_call(f'resnet_jax_onednn_{name}', out, vmap_method='sequential',
                            input_output_aliases=aliases)(*operands, **attributes)


def _conv_call(name, out_shape, *operands, strides, padding, dilation):
    return _call(name, [out_shape], *operands, strides=np.asarray(strides, np.int64),
                 padding=np.asarray(padding, np.int64).reshape(-1), dilation=np.asarray(dilation, np.int64))[0]


def output_shape(x_shape, kernel_shape, strides, padding, dilation):
    """The NHWC shape of the conv of x by the HWIO kernel, as lax.conv_general_dilated gives it."""
    n, h, w, _ = x_shape
    kh, kw, _, o = kernel_shape
    spans = [d * (k - 1) + 1 for k, d in zip((kh, kw), dilation)]
    ho, wo = ((size + lo + hi - span) // s + 1
              for size, (lo, hi), span, s in zip((h, w), padding, spans, strides))
    return n, ho, wo, o


def conv(x, kernel, strides, padding, dilation):
    """The forward conv: NHWC x, HWIO kernel, per-dimension (lo, hi) padding."""
    shape = output_shape(x.shape, kernel.shape, strides, padding, dilation)
    return _conv_call('conv_forward', shape, x, kernel, strides=strides, padding=padding, dilation=dilation)


def input_grad(x_shape, kernel, g, strides, padding, dilation):
    """d(loss)/dx of `conv` for the output gradient g."""
    return _conv_call('conv_input_grad', x_shape, g, kernel, strides=strides, padding=padding, dilation=dilation)


def weight_grad(x, kernel_shape, g, strides, padding, dilation):
    """d(loss)/d(kernel) of `conv` at x for the output gradient g, in HWIO."""
    return _conv_call('conv_weight_grad', kernel_shape, x, g, strides=strides, padding=padding, dilation=dilation)


def batch_norm_grad(x, g, scale, mean, var, epsilon):
    """(dx, dscale, dbias) of training-mode BatchNorm of channels-last x, y = (x - mean) * scale /
    sqrt(var + epsilon) + bias with mean and var x's batch statistics, for the output gradient g."""
    c = x.shape[-1]
    return _call('norm_backward', [x.shape, (c,), (c,)], x, g, scale, mean, var, epsilon=np.float32(epsilon))


def sgd_update(params, momenta, grads, step, finite, *, momentum: float, nesterov: bool, decays):
    """(new params, new momenta) of SGD with momentum on lists of float32 arrays, in place: the
    results take the parameters' and momenta's buffers. step: the signed learning rate (-lr); finite:
    False leaves everything as it was; decays: each parameter's L2 weight decay (0: none). The same
    arithmetic as optax's add_decayed_weights, trace and scale_by_learning_rate, bit for bit."""
    k = len(params)
    results = _call('sgd_update', [p.shape for p in params] * 2, jnp.asarray(step, jnp.float32),
                    jnp.asarray(finite, bool), *params, *momenta, *grads, aliases={2 + i: i for i in range(2 * k)},
                    momentum=np.float32(momentum), nesterov=bool(nesterov), decay=np.asarray(decays, np.float32))
    return results[:k], results[k:]
