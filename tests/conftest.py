"""Test setup: 8 fake CPU devices (set before jax is imported), one persistent compilation
cache for the session, and the repo root on sys.path."""

import atexit
import os
import shutil
import sys
import tempfile

_FAKE_DEVICES = "--xla_force_host_platform_device_count=8"
if _FAKE_DEVICES not in os.environ.get("XLA_FLAGS", ""):  # pytest-xdist workers inherit it
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FAKE_DEVICES).strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Why: many tests compile the same programs again (the tiny presets' train and eval steps, in
# this process and in every script a test launches: the kill -9 test relaunches its run five
# times). jax's persistent cache keys an executable by its program, devices and flags, so a
# hit returns what the compiler would have built. It lives in a temporary folder of this
# session (set before jax is imported; launched scripts and xdist workers inherit it) and is
# removed at the end by the process that made it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="lm-tests-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)


def one_device_env() -> dict:
    """This process's environment without XLA_FLAGS: a script run in a subprocess sees one CPU
    device (the 8 fake ones above make every launch compile and step slower on 2 cores)."""
    return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
