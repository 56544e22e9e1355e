"""lm.native's small-matmul kernel against XLA's dot, and decoding through it."""

import functools
import os
import platform
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import native

needs_kernel = pytest.mark.skipif(
    not native.available(),
    reason="lm.native needs an x86 CPU with AVX-512 or AVX2 + FMA and a C++ compiler",
)


def test_available_on_this_machine():
    # The CI and developer machines are x86 with AVX-512 (Intel) or AVX2 + FMA (AMD) and g++:
    # the kernel must build there, or every benchmark silently measures the XLA fallback.
    if native.isa() is None:
        pytest.skip("this CPU has neither AVX-512 nor AVX2 + FMA")
    assert native.available()


# (rows, K, N). From 5 rows nn runs in tiles of 8 rows x 48 columns over 32 rows of W (AVX2:
# 2 rows, on copies of 32 x 576 blocks of W): the shapes cover ragged row tiles, column tiles,
# blocks and row passes. From 17 rows (a prefill) it packs W into 48-column panels, 2 a task,
# and runs them 192 rows of W at a time: ragged panels (50, 200, 5000), row tiles (17, 100,
# 33) and passes (400: 2 of 200; 1000: 3).
SHAPES = [
    (1, 576, 1536), (2, 1536, 576), (3, 100, 77), (5, 8, 5000), (7, 1000, 9),
    (16, 64, 4100), (8, 576, 576), (13, 200, 100), (16, 1536, 576), (9, 33, 47),
    (17, 64, 50), (100, 400, 200), (64, 1000, 96), (512, 576, 192), (33, 8, 5000),
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


@needs_kernel
@pytest.mark.parametrize("rows", [3, 12, 100])
def test_small_matmuls_of_mixed_weights_equal_xla_dots(rows):
    """One call over float32 and bfloat16 weights of different widths (q/k/v of a bfloat16
    model, a prefill's panels of several weights in one pool of tasks)."""
    rng = np.random.default_rng(rows)
    x = jnp.asarray(rng.standard_normal((rows, 576)), jnp.float32)
    ws = [
        jnp.asarray(rng.standard_normal((576, n)), dt)
        for n, dt in [(576, jnp.float32), (192, jnp.bfloat16), (1536, jnp.float32), (50, jnp.bfloat16)]
    ]  # fmt: skip
    got = jax.jit(native.small_matmuls)(x, ws)
    for g, w in zip(got, ws, strict=True):
        want = np.asarray(x, np.float64) @ np.asarray(w.astype(jnp.float32), np.float64)
        assert g.shape == want.shape and g.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(g), want, rtol=0, atol=1e-5 * np.sqrt(576) * 4)


@needs_kernel
def test_small_matmuls_are_bitwise_repeatable():
    """The threads claim chunks as they come free; the sums must not depend on who ran what
    (greedy decoding and a seed's samples are repeatable only then)."""
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((16, 1536)), jnp.float32)
    ws = [jnp.asarray(rng.standard_normal((1536, n)), jnp.float32) for n in (576, 192, 6000)]
    f = jax.jit(native.small_matmuls)
    first = [np.asarray(g) for g in f(x, ws)]
    for _ in range(20):
        for g, want in zip(f(x, ws), first, strict=True):
            np.testing.assert_array_equal(np.asarray(g), want)


@needs_kernel
@pytest.mark.parametrize(
    "rows,k,n", [(1, 576, 1536), (12, 64, 100), (100, 400, 200), (512, 576, 1536)]
)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gated_matmul_equals_silu_gate_times_up(rows, k, n, dtype):
    """The SwiGLU hidden layer in one call: decoding's row blocks and tiles (1, 12 rows) and
    the prefill's panels (ragged 200 = 4 panels + 8 columns, 100 rows = 12 tiles + 4)."""
    rng = np.random.default_rng(rows + n)
    x = jnp.asarray(rng.standard_normal((rows, k)), jnp.float32)
    wg, wu = (jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), dtype) for _ in range(2))
    got = jax.jit(native.gated_matmul)(x, wg, wu)
    xf = np.asarray(x, np.float64)
    g = xf @ np.asarray(wg.astype(jnp.float32), np.float64)
    u = xf @ np.asarray(wu.astype(jnp.float32), np.float64)
    want = g / (1 + np.exp(-g)) * u
    assert got.shape == (rows, n) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-5)
    with pytest.raises(ValueError, match="differ"):
        native.gated_matmul(x, wg, wu[:, :-1])


@needs_kernel
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("m,k,n", [(1, 576, 576), (3, 64, 5000), (12, 1536, 576), (100, 400, 200)])
def test_small_matmul_lands_on_the_residual(m, k, n, dtype):
    """x @ w + residual in one call (the o and down products of a decoding block): row blocks
    (1, 3 rows; 5000 columns, an LM head's width, goes through row chunks too), tiles (12) and
    the prefill's panels (100)."""
    rng = np.random.default_rng(m + k)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, n)), dtype)
    r = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
    got = jax.jit(lambda x, w, r: native.small_matmul(x, w, residual=r))(x, w, r)
    want = np.asarray(x, np.float64) @ np.asarray(w.astype(jnp.float32), np.float64)
    np.testing.assert_allclose(
        np.asarray(got), want + np.asarray(r), rtol=0, atol=4e-5 * np.sqrt(k)
    )
    with pytest.raises(ValueError, match="residual"):
        native.small_matmul(x, w, residual=r[:, :-1])


def test_pack_layout_and_unpack():
    """Panels of 24 columns stored whole, K rows each, the last N % 24 columns after them; a
    stacked [L, K, N] packs layer by layer (scan_layers)."""
    k, n = 5, 53  # two full panels and a 5-column tail
    w = jnp.arange(k * n, dtype=jnp.float32).reshape(k, n)
    p = native.pack(w)
    assert p.shape == w.shape and p.dtype == w.dtype
    flat = np.asarray(p).reshape(-1)
    for j, width in ((0, 24), (24, 24), (48, 5)):
        panel = flat[j * k : j * k + k * width].reshape(k, width)
        np.testing.assert_array_equal(panel, np.asarray(w)[:, j : j + width])
    np.testing.assert_array_equal(np.asarray(native.unpack(p)), np.asarray(w))
    stacked = jnp.stack([w, w + 1000])
    np.testing.assert_array_equal(
        np.asarray(native.pack(stacked)[1]), np.asarray(native.pack(w + 1000))
    )
    np.testing.assert_array_equal(
        np.asarray(native.unpack(native.pack(stacked))), np.asarray(stacked)
    )


# (rows, K, N) for packed weights: 1 to 4 rows (one pass of the 4 x 24 tiles), 5 to 16 (up to
# 4 passes, ragged), 17 and more (a prefill: float32 through the same tiles, bfloat16 through
# gemm_many's 48-column panels read from the packed ones); N with a tail panel (50, 77,
# 5000 + 8) and without (576, 192).
PACKED_SHAPES = [
    (1, 576, 1536), (3, 100, 77), (4, 576, 192), (5, 8, 5008), (12, 1536, 576), (16, 64, 50),
    (17, 64, 50), (100, 400, 200), (64, 576, 77),
]  # fmt: skip


@needs_kernel
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("m,k,n", PACKED_SHAPES)
def test_packed_products_equal_xla_dots(m, k, n, dtype):
    """x @ W, + residual, q/k/v-like sets of weights and the SwiGLU layer, from packed W."""
    rng = np.random.default_rng(m * 7 + n)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    w, w2 = (jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), dtype) for _ in range(2))
    r = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
    pw, pw2 = native.pack(w), native.pack(w2)
    xf = np.asarray(x, np.float64)
    want, want2 = (xf @ np.asarray(a.astype(jnp.float32), np.float64) for a in (w, w2))
    tol = dict(rtol=0, atol=2e-5 * np.sqrt(k))
    got = jax.jit(functools.partial(native.small_matmul, packed=True))(x, pw)
    np.testing.assert_allclose(np.asarray(got), want, **tol)
    got = jax.jit(lambda x, w, r: native.small_matmul(x, w, residual=r, packed=True))(x, pw, r)
    np.testing.assert_allclose(np.asarray(got), want + np.asarray(r), **tol)
    w3 = jnp.asarray(rng.standard_normal((k, n // 2 + 1)), jnp.bfloat16)  # another width, dtype
    got = jax.jit(functools.partial(native.small_matmuls, packed=True))(x, [pw, native.pack(w3)])
    np.testing.assert_allclose(np.asarray(got[0]), want, **tol)
    want3 = xf @ np.asarray(w3.astype(jnp.float32), np.float64)
    np.testing.assert_allclose(np.asarray(got[1]), want3, rtol=0, atol=4e-5 * np.sqrt(k))
    got = jax.jit(functools.partial(native.gated_matmul, packed=True))(x, pw, pw2)
    np.testing.assert_allclose(np.asarray(got), want / (1 + np.exp(-want)) * want2, **tol)
    with pytest.raises(ValueError, match="packed"):
        native.small_matmul(x, pw, transpose_w=True, packed=True)


@needs_kernel
def test_packed_products_are_bitwise_repeatable():
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.standard_normal((16, 1536)), jnp.float32)
    ws = [native.pack(jnp.asarray(rng.standard_normal((1536, n)), jnp.float32)) for n in (576, 200)]
    f = jax.jit(functools.partial(native.small_matmuls, packed=True))
    first = [np.asarray(g) for g in f(x, ws)]
    for _ in range(20):
        for g, want in zip(f(x, ws), first, strict=True):
            np.testing.assert_array_equal(np.asarray(g), want)


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
     (2, 2, 4, 32, 16, "bfloat16"), (4, 1, 1, 17, 5, "float32"), (2, 2, 5, 48, 70, "float32")],
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
    mask[0, index + 1 :] = False  # a decoding step's: nothing past the index (the kernel cuts)
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
@pytest.mark.parametrize(
    "b,t,kv,g,h,s,index,dtype,kind",
    [(1, 200, 3, 3, 64, 232, 0, "float32", "causal"), (2, 37, 2, 4, 80, 50, 0, "float32", "causal"),
     (2, 33, 1, 1, 32, 40, 5, "float32", "random"), (3, 70, 3, 2, 17, 100, 20, "bfloat16", "random"),
     (2, 64, 3, 3, 64, 96, 0, "bfloat16", "causal"), (1, 2, 1, 3, 8, 2, 0, "float32", "causal")],
)  # fmt: skip
def test_prefill_attention_equals_dot_attention(b, t, kv, g, h, s, index, dtype, kind):
    """The prefill kernel against slice updates + lm.layers.dot_attention over the first E =
    index + T slots: several token blocks and register tiles, ragged H (80, 17) and tiles,
    grouped heads, left padding (padding tokens see no key: the mean of the values), random
    masks, writes at an offset, and the caches it returns."""
    from lm.layers import dot_attention

    rng = np.random.default_rng(b * 7 + t)
    q = jnp.asarray(rng.standard_normal((b, t, kv * g, h)) * 2, jnp.float32)
    k_new = jnp.asarray(rng.standard_normal((b, t, kv, h)), jnp.float32)
    v_new = jnp.asarray(rng.standard_normal((b, t, kv, h)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, kv, h, s)), dtype)
    v = jnp.asarray(rng.standard_normal((b, kv, s, h)), dtype)
    e = index + t
    if kind == "causal":
        pad = rng.integers(0, t // 2 + 1, b)
        valid = np.arange(e)[None, :] >= pad[:, None]
        mask = (np.arange(e)[None, None, :] <= index + np.arange(t)[None, :, None]) & valid[:, None]
    else:
        mask = rng.random((b, t, e)) < 0.6
        mask[0, t // 2] = False
    got, got_k, got_v = jax.jit(native.prefill_attention)(
        q, k_new, v_new, k, v, jnp.int32(index), jnp.asarray(mask)
    )
    want_k = k.at[:, :, :, index : index + t].set(k_new.transpose(0, 2, 3, 1).astype(dtype))
    want_v = v.at[:, :, index : index + t].set(v_new.transpose(0, 2, 1, 3).astype(dtype))
    np.testing.assert_array_equal(np.asarray(got_k, np.float32), np.asarray(want_k, np.float32))
    np.testing.assert_array_equal(np.asarray(got_v, np.float32), np.asarray(want_v, np.float32))
    f32 = jnp.float32
    want = dot_attention(
        q, want_k[..., :e].astype(f32), want_v[:, :, :e].astype(f32), jnp.asarray(mask)[:, None]
    )
    assert got.shape == q.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=4e-6, rtol=4e-6)


def test_prefill_attention_rejects_bad_operands():
    q, m, i = jnp.ones((2, 4, 6, 8)), jnp.ones((2, 4, 5), bool), jnp.int32(0)
    k, v, new = jnp.ones((2, 3, 8, 5)), jnp.ones((2, 3, 5, 8)), jnp.ones((2, 4, 3, 8))
    with pytest.raises(ValueError, match="do not match"):
        native.prefill_attention(q, new, new, k, v, i, jnp.ones((2, 4, 6), bool))
    with pytest.raises(ValueError, match=r"\[B, KV, S, H\]"):
        native.prefill_attention(q, new, new, k, k, i, m)
    with pytest.raises(ValueError, match="new k"):
        native.prefill_attention(q, new[:, :3], new, k, v, i, m)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        f16 = jnp.float16
        native.prefill_attention(q, new, new, k.astype(f16), v.astype(f16), i, m)
    with pytest.raises(ValueError, match=r"must both be \(2, 4, 4\)"):
        native.prefill_attention(q, new, new, k, v, i, m, jnp.ones((2, 4, 4)), None)
    with pytest.raises(ValueError, match=r"must both be \(2, 4\)"):
        native.decode_attention(q[:, 0], new[:, 0], new[:, 0], k, v, i, m[:, 0], m[:, 0], m[:, 0])


@needs_kernel
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kernel", ["decode", "prefill"])
def test_attention_kernels_rotate_by_rope(kernel, dtype):
    """Both attention kernels take un-rotated q and k plus the RoPE tables: against
    lm.layers.apply_rope, then the slice updates and dot_attention (per-row angles, a ragged
    half of 20 lanes)."""
    from lm.layers import apply_rope, dot_attention, rope_angles

    b, t, kv, g, h, s = 3, (1 if kernel == "decode" else 45), 2, 3, 40, 60
    rng = np.random.default_rng(7)
    q = jnp.asarray(rng.standard_normal((b, t, kv * g, h)), jnp.float32)
    k_new = jnp.asarray(rng.standard_normal((b, t, kv, h)), jnp.float32)
    v_new = jnp.asarray(rng.standard_normal((b, t, kv, h)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, kv, h, s)), dtype)
    v = jnp.asarray(rng.standard_normal((b, kv, s, h)), dtype)
    index = 7 if kernel == "decode" else 0
    positions = jnp.asarray(rng.integers(0, 1000, (b, t)))
    cos, sin = rope_angles(positions, 1.0 / 10000 ** (jnp.arange(h // 2) / (h // 2)))
    e = index + t
    width = s if kernel == "decode" else e  # the step sees the whole cache, the prefill E slots
    causal = np.arange(width)[None, :] <= index + np.arange(t)[:, None]  # [T, width]
    mask = jnp.asarray(np.broadcast_to(causal, (b, t, width)))
    if kernel == "decode":
        got, got_k, got_v = native.decode_attention(
            q[:, 0], k_new[:, 0], v_new[:, 0], k, v, jnp.int32(index), mask[:, 0],
            cos[:, 0], sin[:, 0],
        )  # fmt: skip
        got = got[:, None]
    else:
        got, got_k, got_v = native.prefill_attention(
            q, k_new, v_new, k, v, jnp.int32(index), mask, cos, sin
        )
    q_rot, k_rot = apply_rope(q, cos, sin), apply_rope(k_new, cos, sin)
    want_k = k.at[:, :, :, index:e].set(k_rot.transpose(0, 2, 3, 1).astype(dtype))
    want_v = v.at[:, :, index:e].set(v_new.transpose(0, 2, 1, 3).astype(dtype))
    # One rounding apart at most (a fused multiply-add against XLA's multiply and add).
    tol = 1e-6 if dtype == "float32" else 8e-3
    f32 = np.float32
    np.testing.assert_allclose(np.asarray(got_k, f32), np.asarray(want_k, f32), rtol=tol, atol=tol)
    np.testing.assert_array_equal(np.asarray(got_v, f32), np.asarray(want_v, f32))
    want = dot_attention(
        q_rot, got_k[..., :width].astype(jnp.float32), got_v[:, :, :width].astype(jnp.float32),
        mask[:, None],
    )  # fmt: skip
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=4e-6, rtol=4e-6)
    # Not rotating would be far off: the test sees the rotation.
    assert np.abs(np.asarray(q_rot) - np.asarray(q)).max() > 0.5


@needs_kernel
@pytest.mark.parametrize(
    "b,t,n,kv,h,kind",
    [(12, 64, 4, 4, 32, "causal"), (2, 37, 6, 2, 20, "padded"), (3, 16, 3, 1, 64, "packed"),
     (2, 9, 2, 2, 8, "random")],
)  # fmt: skip
def test_train_attention_values_and_gradients(b, t, n, kv, h, kind):
    """The training kernel against lm.layers.dot_attention, values and the gradients of q, k
    and v: the Shakespeare shape, grouped heads with ragged H, right padding (padding queries
    see no key), packed segments, random masks."""
    from lm.layers import attention_mask, dot_attention

    rng = np.random.default_rng(t)
    q, k, v = (
        jnp.asarray(rng.standard_normal(shape), jnp.float32)
        for shape in ((b, t, n, h), (b, t, kv, h), (b, t, kv, h))
    )
    w = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)
    valid = np.arange(t)[None, :] < t - rng.integers(0, t // 3 + 1, b)[:, None]
    seg = None
    if kind == "packed":
        seg = jnp.asarray(np.repeat(np.arange(4), -(-t // 4))[:t][None].repeat(b, 0))
    if kind == "random":
        mask = jnp.asarray(rng.random((b, 1, t, t)) < 0.5).at[0, 0, 3].set(False)  # sees none
    else:
        pos = jnp.arange(t)
        mask = attention_mask(jnp.asarray(valid if kind == "padded" else np.ones((b, t))), True,
                              pos, seg, seg)  # fmt: skip

    def loss(attend, q, k, v):
        return jnp.sum(attend(q, k, v, mask) * w)

    def ref(q, k, v, mask):
        return dot_attention(q, k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3), mask)

    assert native.train_fits(q, k)
    np.testing.assert_allclose(
        np.asarray(native.train_attention(q, k, v, mask)), np.asarray(ref(q, k, v, mask)),
        atol=3e-6, rtol=3e-6,
    )  # fmt: skip
    got = jax.jit(jax.grad(functools.partial(loss, native.train_attention), (0, 1, 2)))(q, k, v)
    want = jax.grad(functools.partial(loss, ref), (0, 1, 2))(q, k, v)
    for g, r in zip(got, want):
        assert g.shape == r.shape
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=2e-5, rtol=2e-5)


@needs_kernel
@pytest.mark.parametrize("b,t,n,kv,h", [(12, 64, 4, 4, 32), (2, 37, 6, 2, 20), (1, 70, 2, 1, 8)])
def test_train_attention_on_the_fused_projection(b, t, n, kv, h):
    """train_attention_qkv on [B, T, (N + 2 KV) H] equals train_attention on its slices, values
    and the gradient (one array, the slices' gradients side by side); causal with padding."""
    from lm.layers import attention_mask

    rng = np.random.default_rng(t)
    qkv = jnp.asarray(rng.standard_normal((b, t, (n + 2 * kv) * h)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)
    valid = np.arange(t)[None, :] < t - rng.integers(0, t // 3 + 1, b)[:, None]
    mask = attention_mask(jnp.asarray(valid), True, jnp.arange(t))

    def separate(qkv):
        q, k, v = jnp.split(qkv, [n * h, (n + kv) * h], axis=-1)
        shape = (b, t, -1, h)
        return native.train_attention(q.reshape(shape), k.reshape(shape), v.reshape(shape), mask)

    def fused(qkv):
        return native.train_attention_qkv(qkv, mask, n, kv)

    np.testing.assert_allclose(np.asarray(fused(qkv)), np.asarray(separate(qkv)), atol=1e-6)
    got = jax.jit(jax.grad(lambda x: jnp.sum(fused(x) * w)))(qkv)
    want = jax.jit(jax.grad(lambda x: jnp.sum(separate(x) * w)))(qkv)
    assert got.shape == qkv.shape and float(jnp.abs(got).max()) > 0.1
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)


def test_train_attention_rejects_bad_operands_and_long_sequences():
    q, k = jnp.ones((2, 4, 6, 8)), jnp.ones((2, 4, 3, 8))
    with pytest.raises(ValueError, match="do not match"):
        native.train_attention(q, k, k[..., :4], jnp.ones((2, 1, 4, 4), bool))
    with pytest.raises(ValueError, match="mask"):
        native.train_attention(q, k, k, jnp.ones((2, 1, 4, 5), bool))
    with pytest.raises(ValueError, match=r"not \[B, T, \(N \+ 2 KV\) H\] for N=6, KV=3"):
        native.train_attention_qkv(jnp.ones((2, 4, 50)), jnp.ones((2, 1, 4, 4), bool), 6, 3)
    with pytest.raises(ValueError, match="mask"):
        native.train_attention_qkv(jnp.ones((2, 4, 96)), jnp.ones((2, 1, 4, 5), bool), 6, 3)
    long_q, long_k = jnp.ones((1, 1024, 4, 8)), jnp.ones((1, 1024, 4, 8))
    assert not native.train_fits(long_q, long_k)  # 2^20 scores per task: XLA's
    assert not native.train_fits(q.astype(jnp.bfloat16), k)


def _tiny_batch_loss(cfg):
    """loss(cfg, params) of one fixed batch of 3 x 24 tokens, the last row padded from 20."""
    import lm

    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (3, 24)))
    mask = jnp.ones_like(tokens).at[2, 20:].set(0)

    def loss(cfg, params):
        logits = lm.forward(cfg, params, tokens, mask=mask)["logits"]
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0] * mask)

    return loss


@needs_kernel
def test_training_through_the_native_attention_equals_xla():
    """A tiny GPT's loss gradient with attention_impl="native" equals "xla" (and the kernel is
    really in the compiled program)."""
    import lm

    cfg = lm.preset("tiny-gpt2")
    params, loss = lm.init_params(cfg, 0), _tiny_batch_loss(cfg)
    native_cfg = cfg.replace(attention_impl="native")
    grad = jax.jit(jax.grad(loss, 1), static_argnums=0)
    assert native.TRAIN_TARGETS[1] in grad.lower(native_cfg, params).as_text()
    got, want = grad(native_cfg, params), grad(cfg.replace(attention_impl="xla"), params)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-4),
        got, want,
    )  # fmt: skip


def _norm_ref(x, scale, bias, norm, eps=1e-5):
    from lm.layers import Norm

    params = {"scale": scale} if bias is None else {"scale": scale, "bias": bias}
    return Norm(norm, eps).apply({"params": params}, x)


def _mlp_ref(x, scale, bias, w1, w2, norm, act, eps):
    from lm.layers import activation

    return x + activation(act)(_norm_ref(x, scale, bias, norm, eps) @ w1) @ w2


def _block_operands(shape, d, f, norm, seed):
    k = jax.random.split(jax.random.PRNGKey(seed), 6)
    x = jax.random.normal(k[0], (*shape, d)) * 2 + 0.5
    scale = 1 + 0.1 * jax.random.normal(k[1], (d,))
    bias = None if norm == "rmsnorm" else 0.1 * jax.random.normal(k[2], (d,))
    w1 = jax.random.normal(k[3], (d, f)) / np.sqrt(d)
    w2 = jax.random.normal(k[4], (f, d)) / np.sqrt(f)
    return x, scale, bias, w1, w2, k[5]


def _assert_grads_close(got, want, rtol=2e-6):
    for g, w in zip(got, want, strict=True):
        scale = float(jnp.abs(w).max())
        assert float(jnp.abs(g - w).max()) <= rtol * max(scale, 1.0), (g, w)


# (leading shape, D, F, norm, activation): the Shakespeare layer (768 rows, 16 tasks of 48),
# ragged row tasks (35, 150 rows), D and F off the 16-lane and 64-column tiles; 300 rows: the
# sums over rows in 128-row blocks and a last short one, D = 72: two norm-sum tasks.
MLP_CASES = [
    ((12, 64), 128, 512, "layernorm", "gelu_tanh"),
    ((2, 150), 72, 136, "layernorm", "gelu_tanh"),
    ((5, 7), 40, 72, "rmsnorm", "relu"),
    ((3, 50), 33, 100, "layernorm", "relu"),
    ((2, 9), 20, 30, "rmsnorm", "gelu_tanh"),
]


@needs_kernel
@pytest.mark.parametrize("shape,d,f,norm,act", MLP_CASES)
def test_train_mlp_and_its_gradient_equal_xla(shape, d, f, norm, act):
    x, scale, bias, w1, w2, kc = _block_operands(shape, d, f, norm, d)
    ct = jax.random.normal(kc, x.shape)
    fn = jax.jit(native.train_mlp, static_argnums=(5, 6, 7))
    got = fn(x, scale, bias, w1, w2, norm, act, 1e-5)
    want = _mlp_ref(x, scale, bias, w1, w2, norm, act, 1e-5)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=5e-6, rtol=1e-5)

    def loss(f):
        return lambda x, s, b, w1, w2: jnp.sum(f(x, s, b, w1, w2, norm, act, 1e-5) * ct)

    argnums = (0, 1, 3, 4) if bias is None else (0, 1, 2, 3, 4)
    got = jax.jit(jax.grad(loss(native.train_mlp), argnums))(x, scale, bias, w1, w2)
    want = jax.jit(jax.grad(loss(_mlp_ref), argnums))(x, scale, bias, w1, w2)
    _assert_grads_close(got, want)


@needs_kernel
def test_train_block_gradients_are_bitwise_repeatable():
    """The backward calls sum the weight and norm gradients over all rows in a fixed order,
    whichever thread takes which block: a training run repeats exactly."""
    x, scale, bias, w1, w2, kc = _block_operands((12, 64), 128, 512, "layernorm", 3)
    ct = jax.random.normal(kc, x.shape)

    def loss(x, s, b, w1, w2):
        y = native.train_mlp(x, s, b, w1, w2, "layernorm", "gelu_tanh", 1e-5)
        return jnp.sum(native.train_norm_dense(y, s, b, w1, "layernorm", 1e-5)[..., :128] * ct)

    grad = jax.jit(jax.grad(loss, (0, 1, 2, 3, 4)))
    first = [np.asarray(g) for g in grad(x, scale, bias, w1, w2)]
    for _ in range(5):
        again = grad(x, scale, bias, w1, w2)
        for a, b in zip(first, again, strict=True):
            np.testing.assert_array_equal(a, np.asarray(b))


@needs_kernel
@pytest.mark.parametrize("shape,d,n,norm", [((12, 64), 128, 384, "layernorm"),
                                            ((5, 7), 40, 72, "rmsnorm"),
                                            ((3, 50), 33, 100, "layernorm")])  # fmt: skip
def test_train_norm_dense_and_its_gradient_equal_xla(shape, d, n, norm):
    x, scale, bias, w, _, kc = _block_operands(shape, d, n, norm, d + 1)
    ct = jax.random.normal(kc, (*shape, n))
    got = jax.jit(native.train_norm_dense, static_argnums=(4, 5))(x, scale, bias, w, norm, 1e-5)
    want = _norm_ref(x, scale, bias, norm) @ w
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=5e-6, rtol=1e-5)

    def loss(f):
        return lambda x, s, b, w: jnp.sum(f(x, s, b, w) * ct)

    def ref(x, s, b, w):
        return _norm_ref(x, s, b, norm) @ w

    def kernel(x, s, b, w):
        return native.train_norm_dense(x, s, b, w, norm, 1e-5)

    argnums = (0, 1, 3) if bias is None else (0, 1, 2, 3)
    got = jax.jit(jax.grad(loss(kernel), argnums))(x, scale, bias, w)
    want = jax.jit(jax.grad(loss(ref), argnums))(x, scale, bias, w)
    _assert_grads_close(got, want)


def test_train_mlp_rejects_bad_operands():
    x, scale, bias, w1, w2, _ = _block_operands((2, 3), 8, 16, "layernorm", 0)
    with pytest.raises(ValueError, match="activation 'silu'"):
        native.train_mlp(x, scale, bias, w1, w2, "layernorm", "silu", 1e-5)
    with pytest.raises(ValueError, match="RMSNorm none"):
        native.train_mlp(x, scale, bias, w1, w2, "rmsnorm", "relu", 1e-5)
    with pytest.raises(ValueError, match=r"w1 \(8, 16\) \[D, F\] and w2 \(8, 16\)"):
        native.train_mlp(x, scale, bias, w1, w1, "layernorm", "relu", 1e-5)
    with pytest.raises(ValueError, match="float32"):
        native.train_mlp(x.astype(jnp.bfloat16), scale, bias, w1, w2, "layernorm", "relu", 1e-5)
    with pytest.raises(ValueError, match="x .* and w .* do not match"):
        native.train_norm_dense(x, scale, bias, w2, "layernorm", 1e-5)


@needs_kernel
@pytest.mark.parametrize(
    "preset,changes",
    [
        # GPT-2 without biases (the Shakespeare recipe's blocks): LayerNorm, gelu_tanh; the
        # attention kernel reads q, k and v inside the fused projection.
        (
            "tiny-gpt2",
            dict(qkv_bias=False, out_bias=False, mlp_bias=False, attention_impl="native"),
        ),  # fmt: skip
        # RMSNorm + RoPE (rotated after the fused projection), ReLU, layers scanned.
        ("tiny", dict(mlp="plain", activation="relu", scan_layers=True)),
    ],
)
def test_training_through_native_blocks_equals_xla(preset, changes):
    """A tiny model's loss gradient with block_impl="native" equals "xla", with both fused
    calls in the compiled program (and, with attention_impl="native" and no RoPE, the attention
    that reads the fused projection); where a block does not fit (GPT-2's biases) the program
    holds neither and the gradient is XLA's."""
    import lm

    cfg = lm.preset(preset).replace(**changes)
    params, loss = lm.init_params(cfg, 0), _tiny_batch_loss(cfg)
    grad = jax.jit(jax.value_and_grad(loss, 1), static_argnums=0)
    native_cfg = cfg.replace(block_impl="native")
    hlo = grad.lower(native_cfg, params).as_text()
    for target in native.MLP_TARGETS + native.NORM_DENSE_TARGETS:
        assert target in hlo
    assert (native.TRAIN_TARGETS[2] in hlo) == (changes.get("attention_impl") == "native")
    xla_cfg = cfg.replace(attention_impl="xla")
    (got_loss, got), (want_loss, want) = grad(native_cfg, params), grad(xla_cfg, params)
    np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-4),
        got, want,
    )  # fmt: skip
    with_biases = lm.preset("tiny-gpt2").replace(block_impl="native")
    hlo = grad.lower(with_biases, lm.init_params(with_biases, 0)).as_text()
    assert not any(t in hlo for t in native.MLP_TARGETS + native.NORM_DENSE_TARGETS)


@needs_kernel
@pytest.mark.parametrize("dtype,rows", [("float32", 1), ("bfloat16", 1), ("float32", 12)])
def test_decoding_through_the_kernel_equals_xla(dtype, rows, monkeypatch):
    from test_decode import random_model

    from lm import decode

    base_cfg, base_params = random_model("tiny")
    cfg, params = decode.prepare(base_cfg, base_params, dtype)
    # Prompts of 4 and 45 tokens: a 64-token prefill (left padding, two of the prefill
    # kernel's token blocks) and the steps after it.
    prompts = [[5, 7, 9, 11], [(3 * i) % 120 + 1 for i in range(45)]]
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


@needs_kernel
@pytest.mark.parametrize("preset", ["tiny", "tiny-gpt2"])
@pytest.mark.parametrize("rows", [1, 12])
def test_decoding_with_packed_weights_equals_row_major(preset, rows, monkeypatch):
    """AVX2 hosts decode from packed weights (native.packs); any x86 host can: same logits to
    float32 rounding, same greedy tokens, and the caller's tree is left row-major."""
    from test_decode import random_model

    from lm import decode

    cfg, params = random_model(preset)
    cfg = cfg.replace(matmul_impl="native")
    monkeypatch.setenv("LM_PACK", "1")
    pcfg, pparams = decode._for_kernel(cfg, params)
    assert pcfg.packed_weights
    q = pparams["layers_0"]["attn"]["q"]["kernel"]
    np.testing.assert_array_equal(
        np.asarray(q), np.asarray(native.pack(params["layers_0"]["attn"]["q"]["kernel"]))
    )
    assert pparams["embed"]["embedding"] is params["embed"]["embedding"]  # a lookup table
    assert decode._for_kernel(cfg, params)[1] is pparams  # packed once per tree
    monkeypatch.setenv("LM_PACK", "0")
    rcfg, rparams = decode._for_kernel(cfg, params)
    assert not rcfg.packed_weights
    np.testing.assert_allclose(
        _step_logits(decode, pcfg, pparams, rows), _step_logits(decode, rcfg, rparams, rows),
        atol=1e-5, rtol=1e-5,
    )  # fmt: skip
    prompts = ([[5, 7, 9, 11], [(3 * i) % 120 + 1 for i in range(45)]] * rows)[: max(rows, 2)]
    tokens = {}
    for pack in ("0", "1"):
        monkeypatch.setenv("LM_PACK", pack)
        tokens[pack] = [g.token_ids for g in decode.generate(cfg, params, prompts, 12)]
    assert tokens["0"] == tokens["1"]
    with pytest.raises(ValueError, match="packed_weights=True needs matmul_impl='native'"):
        cfg.replace(matmul_impl="xla", packed_weights=True)
    # A packed copy that would not fit in half of the free memory is not made.
    decode._FOR_KERNEL.clear()
    monkeypatch.setenv("LM_PACK", "1")
    monkeypatch.setattr(decode.os, "sysconf", lambda name: 1)  # 1 free page of 1 byte
    tight_cfg, tight = decode._for_kernel(cfg, params)
    assert not tight_cfg.packed_weights
    np.testing.assert_array_equal(
        np.asarray(tight["layers_0"]["attn"]["q"]["kernel"]),
        np.asarray(params["layers_0"]["attn"]["q"]["kernel"]),
    )
    from lm.layers import matmul

    with pytest.raises(ValueError, match="need lm.native's kernel"):  # never read as row-major
        matmul(jnp.ones((2, 32)), q, jnp.float32, "xla", packed=True)


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


@pytest.mark.parametrize("march", ["x86-64-v3", "icelake-server"])
def test_kernel_source_compiles_for_both_instruction_sets(march):
    # A CI machine builds the kernels for its own CPU only (AVX2 on AMD, AVX-512 on recent
    # Intel): check that the other instruction set's code (lm/csrc/simd.h) compiles too.
    cxx = os.environ.get("CXX") or shutil.which("g++")
    if not cxx or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("needs g++ on x86")
    cmd = [cxx, f"-march={march}", "-std=c++17", "-fsyntax-only", "-w"]
    out = subprocess.run(
        [*cmd, f"-I{jax.ffi.include_dir()}", native.SOURCE], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
