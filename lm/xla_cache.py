"""jax's persistent compilation cache, as the experiment and decode configs ask for it.

Why: compiling the train and eval steps takes seconds to minutes (MiniLM's smoke run ~10 s of a
~33 s launch on 2 cores, SmolLM2's far more), and every relaunch of the same run compiles the
same programs again: a resume after preemption or a crash, a second decode of the same
(batch, length) bucket. jax keys a compiled executable by its program, devices, compiler
flags and jax/jaxlib versions, so a hit returns what the compiler would have built.

``config.compilation_cache`` names the folder (default ``~/.cache/lm/xla``; empty: off). When
the environment sets ``JAX_COMPILATION_CACHE_DIR``, that folder is used instead (jax has read
it at import; the test suite points it at a temporary folder). Programs that compile in under
a second are not stored (``jax_persistent_cache_min_compile_time_secs``).
"""

from __future__ import annotations

import os

DEFAULT = "~/.cache/lm/xla"


def use(path: str | None) -> str | None:
    """Store and look up compiled programs in ``path`` from now on (unless the environment
    already chose a folder), also after earlier compilations. Returns the folder in use,
    or None when the cache is off."""
    env = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if env:
        return env
    if not path:
        return None
    import jax

    path = os.path.abspath(os.path.expanduser(path))
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return path
