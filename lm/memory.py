"""Host memory: keep what XLA:CPU frees for its next step instead of returning it to the OS.

XLA:CPU allocates each execution's buffers (a training step's activations, a prefill's) with
malloc and frees them at its end. glibc serves blocks above its mmap threshold (128 KiB at
first, adapting up to 32 MiB) with fresh mappings and returns them on free, so every step
faults its pages in again: the Shakespeare step (lm.train, 768 rows) took 11,700 minor page
faults, ~10 ms of ~57. Raising the mmap and trim thresholds keeps the freed memory in the heap
for reuse: 0-250 faults a step, 46 against 37.5 ms (medians, same process, native blocks).
The cost: the process keeps its peak heap instead of shrinking after it (blocks above
MMAP_THRESHOLD are still mapped and unmapped). lm.train.run sets it; decoding does not need
it (a 512-token SmolLM2 prefill took ~1 fault either way).

    from lm import memory
    memory.keep_freed_memory()   # once, before the work; a no-op off glibc or with LM_MALLOC=0

PyTorch's CPU allocator is glibc malloc too; it took ~500 faults a step on the same model.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 512 << 20  # larger blocks (whole checkpoints) are still mapped and returned
TRIM_THRESHOLD = 1 << 30  # free memory kept at the heap's top before it is given back


@functools.cache
def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once). Returns whether they
    were set: False off Linux/glibc, when ``LM_MALLOC=0``, or if mallopt refused."""
    if os.environ.get("LM_MALLOC", "1") == "0":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (macOS, musl without mallopt): nothing to tune
    ok = (
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    )
    if not ok:
        log.info("lm.memory: mallopt refused the thresholds; malloc keeps its defaults")
    return ok
