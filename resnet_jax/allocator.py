"""glibc malloc settings that keep freed memory in the process, for training on a CPU.

XLA:CPU takes each step's temporary buffers from malloc and frees them at the end of the step. glibc
hands such large blocks back to the kernel (mmap/munmap, and the trimming of its per-thread arenas),
so every step faults in its working set again: ~50,000 page faults per ResNet-20 step at batch 128,
about a fifth of the step's CPU time (experiments/perf/CPU_NOTES.md, entry 18). One arena, no
mmap-ed blocks and no trimming keep that memory, and the faults go. The commands (train, evaluate,
bench, analyze) apply them before JAX loads, on a CPU-only installation, unless the user has set
any malloc setting of their own; they are also exported so that the processes a command starts
(the bench's, a sweep's runs) get them at startup.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import sys

# (environment variable glibc reads at startup, mallopt parameter, value)
SETTINGS = (('MALLOC_ARENA_MAX', -8, 1), ('MALLOC_MMAP_MAX_', -4, 0), ('MALLOC_TRIM_THRESHOLD_', -1, 2**31 - 1))


def _cpu_only() -> bool:
    """Whether JAX will run on the CPU: JAX_PLATFORMS says so, or no accelerator plugin is installed."""
    platforms = os.environ.get('JAX_PLATFORMS', '').strip()
    if platforms:
        return platforms == 'cpu'
    return not importlib.metadata.entry_points(group='jax_plugins') and importlib.util.find_spec('libtpu') is None


def _user_chose() -> bool:
    return any(name.startswith('MALLOC_') for name in os.environ) or 'malloc' in os.environ.get('GLIBC_TUNABLES', '')


def keep_freed_memory() -> bool:
    """Applies SETTINGS to this process and its future children; whether it did. Only before JAX
    has started its threads (they would keep the arenas they have), with glibc, on a CPU-only
    installation, and when the user has set no malloc setting of their own."""
    if 'jax' in sys.modules or not sys.platform.startswith('linux') or _user_chose() or not _cpu_only():
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (raises AttributeError where the C library is not glibc)
    except (OSError, AttributeError):
        return False
    for variable, parameter, value in SETTINGS:
        libc.mallopt(parameter, value)
        os.environ[variable] = str(value)
    return True
