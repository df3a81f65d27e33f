"""Give freed heap memory back to the operating system between training steps (CPU, glibc).

PyTorch's CPU allocator is the C library's malloc. A training step frees gigabytes of activations,
logits and rollout KV caches, but glibc keeps much of the freed heap mapped (fragmented arenas below
the mmap threshold, which itself rises to 32 MB once large blocks are freed), so the resident set grows
to the sum of every step's peaks rather than staying at the live tensors. `malloc_trim(0)` returns the
free pages of every arena (madvise). Measured on the 135M RL step: bench/results/memory.json.
On other C libraries (musl, macOS) and on GPU memory it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return lib if lib is not None and hasattr(lib, "malloc_trim") else None


def release_freed_memory() -> bool:
    """malloc_trim(0): True when glibc gave memory back, False when it had none to give or is absent."""
    lib = _libc()
    return bool(lib.malloc_trim(0)) if lib is not None else False


def release_memory_callback():
    """A transformers TrainerCallback that releases freed memory after every optimizer step and save."""
    from transformers import TrainerCallback

    class ReleaseFreedMemory(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            release_freed_memory()

        def on_save(self, args, state, control, **kw):
            release_freed_memory()

    return ReleaseFreedMemory()
