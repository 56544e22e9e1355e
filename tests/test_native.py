"""lm.native's small-matmul kernel against XLA's dot, and decoding through it."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import native

needs_kernel = pytest.mark.skipif(
    not native.available(), reason="lm.native needs an x86 CPU with AVX-512 and a C++ compiler"
)


def test_available_on_this_machine():
    # The CI and developer machines are AVX-512 x86 with g++: the kernel must build there, or
    # every decoding benchmark silently measures the XLA fallback.
    flags = native._cpu_flags()
    if not set(native._REQUIRED_FLAGS) <= flags:
        pytest.skip("this CPU lacks AVX-512")
    assert native.available()


# (rows, K, N). From 5 rows nn runs in tiles of 8 rows x 48 columns over 32 rows of W: the
# shapes cover ragged row tiles, column tiles and row passes.
SHAPES = [
    (1, 576, 1536), (2, 1536, 576), (3, 100, 77), (5, 8, 5000), (7, 1000, 9),
    (16, 64, 4100), (8, 576, 576), (13, 200, 100), (16, 1536, 576), (9, 33, 47),
]  # fmt: skip


@needs_kernel
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("transpose_w", [False, True])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_small_matmul_equals_xla_dot(m, k, n, transpose_w, dtype):
    rng = np.random.default_rng(m * 1000 + n)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((n, k) if transpose_w else (k, n)), dtype)
    got = jax.jit(native.small_matmul, static_argnums=2)(x, w, transpose_w)
    wf = np.asarray(w.astype(jnp.float32), np.float64)
    want = np.asarray(x, np.float64) @ (wf.T if transpose_w else wf)
    assert got.shape == (m, n) and got.dtype == jnp.float32
    # float32 accumulation over k terms of unit size
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5 * np.sqrt(k) * 4)


def test_small_matmul_rejects_bad_operands():
    x = jnp.ones((2, 8), jnp.float32)
    with pytest.raises(ValueError, match="do not contract"):
        native.small_matmul(x, jnp.ones((9, 4), jnp.float32))
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        native.small_matmul(x, jnp.ones((8, 4), jnp.float16))
    with pytest.raises(ValueError, match="2-D"):
        native.small_matmul(x[None], jnp.ones((8, 4), jnp.float32))


@needs_kernel
@pytest.mark.parametrize("dtype,rows", [("float32", 1), ("bfloat16", 1), ("float32", 12)])
def test_decoding_through_the_kernel_equals_xla(dtype, rows, monkeypatch):
    from test_decode import random_model

    from lm import decode

    cfg, params = random_model("tiny")
    cfg, params = decode.prepare(cfg, params, dtype)
    prompts = [[5, 7, 9, 11], [3, 6, 9, 12, 15, 18, 21]]
    assert decode.matmul_impl(params) == "native"
    native_logits = _step_logits(decode, cfg.replace(matmul_impl="native"), params, rows)
    xla_logits = _step_logits(decode, cfg.replace(matmul_impl="xla"), params, rows)
    tol = 1e-5 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(native_logits, xla_logits, atol=tol, rtol=tol)
    prompts = (prompts * rows)[: max(rows, 2)]
    got = [g.token_ids for g in decode.generate(cfg, params, prompts, 12)]
    monkeypatch.setattr(decode, "matmul_impl", lambda params: "xla")
    decode._COMPILED.clear()
    want = [g.token_ids for g in decode.generate(cfg, params, prompts, 12)]
    decode._COMPILED.clear()
    if dtype == "float32":
        assert got == want


def _step_logits(decode, cfg, params, rows):
    """Logits of one cached decoding step of ``rows`` rows (1 to 4: the kernel's row-block
    path; 5 to 16: its register tiles) after a prompt of 4 tokens, different in each row."""
    from lm.model import init_cache

    tokens = (jnp.asarray([[5, 7, 9, 11]], jnp.int32) + jnp.arange(rows)[:, None]) % cfg.vocab_size
    mask = jnp.ones_like(tokens)
    positions = jnp.broadcast_to(jnp.arange(4, dtype=jnp.int32), (rows, 4))
    cache = init_cache(cfg, rows, 16)
    cache["index"] = 0
    _, cache = decode._trunk(cfg, params, tokens, mask, positions, cache)
    h, _ = jax.jit(decode._trunk, static_argnums=0)(
        cfg, params, (13 + jnp.arange(rows)[:, None]) % cfg.vocab_size,
        jnp.ones((rows, 1), jnp.int32), jnp.full((rows, 1), 4), cache,
    )  # fmt: skip
    return np.asarray(jax.jit(decode._lm_head, static_argnums=0)(cfg, params, h[:, 0]))


def test_lm_native_0_turns_the_kernel_off(tmp_path):
    code = "from lm import native; print(native.available())"
    env = dict(os.environ, LM_NATIVE="0", LM_NATIVE_CACHE=str(tmp_path))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
    assert not list(tmp_path.iterdir())  # nothing was built
