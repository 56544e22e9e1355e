"""Test setup: 8 fake CPU devices (set before jax is imported) and the repo root on sys.path."""

import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def one_device_env() -> dict:
    """This process's environment without XLA_FLAGS: a script run in a subprocess sees one CPU
    device (the 8 fake ones above make every launch compile and step slower on 2 cores)."""
    return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
