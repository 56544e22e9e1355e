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
@pytest.mark.parametrize(
    "b,kv,g,h,s,dtype",
    [(1, 3, 3, 64, 144, "float32"), (16, 3, 3, 64, 37, "float32"), (3, 1, 2, 80, 200, "bfloat16"),
     (2, 2, 4, 32, 16, "bfloat16"), (4, 1, 1, 17, 5, "float32")],
)  # fmt: skip
def test_decode_attention_equals_dot_attention(b, kv, g, h, s, dtype):
    """The kernel's attention step against slice updates + lm.layers.dot_attention: ragged S
    and H (masked vector tails), grouped heads, random masks, a row that sees no key (mean of
    the values), and the caches it returns."""
    from lm.layers import dot_attention

    rng = np.random.default_rng(b * 100 + s)
    q = jnp.asarray(rng.standard_normal((b, kv * g, h)) * 2, jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, kv, h, s)), dtype)
    v = jnp.asarray(rng.standard_normal((b, kv, s, h)), dtype)
    k_new = jnp.asarray(rng.standard_normal((b, kv, h)), jnp.float32)
    v_new = jnp.asarray(rng.standard_normal((b, kv, h)), jnp.float32)
    index = s // 2
    mask = rng.random((b, s)) < 0.7
    mask[:, index] = True
    if b > 1:
        mask[1] = False
    got, got_k, got_v = jax.jit(native.decode_attention)(
        q, k_new, v_new, k, v, jnp.int32(index), jnp.asarray(mask)
    )
    want_k = k.at[:, :, :, index].set(k_new.astype(dtype))
    want_v = v.at[:, :, index, :].set(v_new.astype(dtype))
    np.testing.assert_array_equal(np.asarray(got_k, np.float32), np.asarray(want_k, np.float32))
    np.testing.assert_array_equal(np.asarray(got_v, np.float32), np.asarray(want_v, np.float32))
    f32 = jnp.float32
    m4 = jnp.asarray(mask)[:, None, None]
    want = dot_attention(q[:, None], want_k.astype(f32), want_v.astype(f32), m4)
    assert got.shape == (b, kv * g, h) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want[:, 0]), atol=2e-6, rtol=2e-6)


def test_decode_attention_rejects_bad_operands():
    q, m, i = jnp.ones((2, 6, 8)), jnp.ones((2, 5), bool), jnp.int32(1)
    k, v, new = jnp.ones((2, 3, 8, 5)), jnp.ones((2, 3, 5, 8)), jnp.ones((2, 3, 8))
    with pytest.raises(ValueError, match="do not match"):
        native.decode_attention(q, new, new, k, v, i, jnp.ones((2, 4), bool))
    with pytest.raises(ValueError, match=r"\[B, KV, S, H\]"):
        native.decode_attention(q, new, new, k, k, i, m)
    with pytest.raises(ValueError, match="new k"):
        native.decode_attention(q, new[:, :2], new, k, v, i, m)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        f16 = jnp.float16
        native.decode_attention(q, new, new, k.astype(f16), v.astype(f16), i, m)


@needs_kernel
@pytest.mark.parametrize("dtype,rows", [("float32", 1), ("bfloat16", 1), ("float32", 12)])
def test_decoding_through_the_kernel_equals_xla(dtype, rows, monkeypatch):
    from test_decode import random_model

    from lm import decode

    base_cfg, base_params = random_model("tiny")
    cfg, params = decode.prepare(base_cfg, base_params, dtype)
    prompts = [[5, 7, 9, 11], [3, 6, 9, 12, 15, 18, 21]]
    assert decode.matmul_impl(params) == "native"
    native_logits = _step_logits(decode, cfg.replace(matmul_impl="native"), params, rows)
    xla_logits = _step_logits(decode, cfg.replace(matmul_impl="xla"), params, rows)
    if dtype == "float32":
        np.testing.assert_allclose(native_logits, xla_logits, atol=1e-5, rtol=1e-5)
    else:
        # bfloat16 weights: the kernel accumulates (and attends) in float32 where XLA rounds
        # the attention's operands to bfloat16, so both are held to the float32 model's logits.
        ref_cfg, ref_params = decode.prepare(base_cfg, base_params, "float32")
        ref = _step_logits(decode, ref_cfg.replace(matmul_impl="xla"), ref_params, rows)
        xla_err = np.abs(xla_logits - ref).max()
        assert 0 < xla_err < 0.2
        # Different roundings, the same size of error (a wrong kernel is off by O(1)).
        assert np.abs(native_logits - ref).max() <= 2 * xla_err
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
