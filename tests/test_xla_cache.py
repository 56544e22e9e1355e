"""lm.xla_cache: config.compilation_cache turns on jax's persistent cache; the environment wins."""

import os
import subprocess
import sys

from lm import xla_cache
from lm.experiment import MUTABLE, base_config, config_differences, config_to_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A fresh process: a compilation, lm.xla_cache.use, then the compilation that must be stored.
PROBE = """
import sys
import jax, jax.numpy as jnp
jax.jit(lambda a: a + 1)(jnp.ones(2))  # a compilation before the cache is set is no obstacle
from lm import xla_cache
print(xla_cache.use(sys.argv[1]))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # store even this one
print(float(jax.jit(lambda a: (a * 2).sum())(jnp.ones(3))))
"""


def _probe(folder, env_dir=None):
    env = {
        k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "XLA_FLAGS")
    }
    if env_dir:
        env["JAX_COMPILATION_CACHE_DIR"] = env_dir
    out = subprocess.run(
        [sys.executable, "-c", PROBE, folder], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()


def test_config_folder_stores_compiled_programs(tmp_path):
    folder = tmp_path / "xla"
    assert _probe(str(folder)) == [str(folder), "6.0"]
    entries = sorted(os.listdir(folder))
    assert any(e.startswith("jit__lambda-") for e in entries), entries
    # The same programs again are hits: nothing new is written.
    _probe(str(folder))
    assert sorted(os.listdir(folder)) == entries


def test_environment_wins_and_empty_is_off(tmp_path, monkeypatch):
    env_dir = tmp_path / "env"
    assert _probe(str(tmp_path / "cfg"), env_dir=str(env_dir)) == [str(env_dir), "6.0"]
    assert not (tmp_path / "cfg").exists()
    assert any(e.startswith("jit__lambda-") for e in os.listdir(env_dir))
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    assert xla_cache.use("") is None and xla_cache.use(None) is None


def test_default_and_resuming_with_another_folder_is_the_same_run():
    c = base_config()
    assert c.compilation_cache == xla_cache.DEFAULT
    d = c.copy_and_resolve_references()
    d.compilation_cache = ""
    assert "compilation_cache" in MUTABLE
    assert config_differences(config_to_dict(c), config_to_dict(d)) == []
