"""lm.memory: XLA:CPU's per-execution buffers are reused instead of faulted in on every call."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A jitted function whose temporaries (four [1024, 1024] float32 products, 4 MiB each) lie
# above glibc's default mmap threshold; prints the minor page faults of 10 calls after 3.
PROBE = """
import resource, sys
import jax, jax.numpy as jnp
from lm import memory
tuned = memory.keep_freed_memory()
f = jax.jit(lambda x: ((x @ x) @ (x + 1.0) + (x * 2.0) @ x).sum())
x = jnp.ones((1024, 1024), jnp.float32) / 1024
for _ in range(3):
    f(x).block_until_ready()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    f(x).block_until_ready()
print(int(tuned), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def _faults(tune: bool) -> tuple[bool, int]:
    env = dict(os.environ, LM_MALLOC="1" if tune else "0", PYTHONPATH=ROOT)
    env.pop("XLA_FLAGS", None)  # one device: the probe's own allocation pattern
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0] == "1", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_buffers_are_reused_not_faulted_in_again():
    tuned, with_tuning = _faults(True)
    untuned, without = _faults(False)
    assert tuned and not untuned  # LM_MALLOC=0 leaves malloc alone
    # Untuned, every call maps its temporaries afresh: ~1,000 faults per 4 MiB buffer.
    assert without > 5000, without
    assert with_tuning < without / 10, (with_tuning, without)
