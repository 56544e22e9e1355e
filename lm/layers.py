"""Building blocks: Dense (with optional LoRA), embeddings, norms, rotary positions, attention, MLP.

Every parameter carries logical axis names (``vocab, embed, heads, kv, mlp``) through
``nn.with_logical_partitioning``; ``lm.sharding`` maps them to mesh axes. Shapes use
B=batch, T=query length, S=key length, D=d_model, N=heads, K=kv heads, H=head_dim.

Numerics (see ../PERF-NOTES in the design notes): matmuls take operands in the compute dtype and
accumulate in float32 (``preferred_element_type``), which is both what GPUs/TPUs do and the fast
AMX path for bfloat16 on the CPUs we develop on; norms and softmax run in float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm import native
from lm.config import ModelConfig
from lm.dropout import Dropout

Array = jax.Array


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def _kernel_init(std: float = 0.02):
    return nn.initializers.normal(stddev=std)


def matmul(
    x: Array,
    w: Array,
    dtype,
    impl: str = "xla",
    residual: Array | None = None,
    packed: bool = False,
) -> Array:
    """x[..., I] @ w[I, O] with float32 accumulation, returned in ``dtype`` (plus ``residual``
    [..., O] when given).

    ``impl="native"`` (decoding on CPU, set by lm.decode) sends the product to lm.native's
    kernel, which streams float32 or bfloat16 weights without widening them through memory
    (and lands it on the residual in place); it has no gradient. ``packed``: w is in
    lm.native.pack's layout, which only that kernel reads.
    """
    # As one 2-D [N, I] x [I, O] product: XLA:CPU differentiates a 3-D dot_general into
    # transposes plus dots about 2x slower than the 2-D ones (measured on the train step).
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if impl == "native" and native.fits_matmul(x2.shape[0], w):
        if residual is not None:
            r2 = residual.reshape(-1, residual.shape[-1])
            y = native.small_matmul(x2, w, residual=r2, packed=packed)
            return y.astype(dtype).reshape(*lead, w.shape[-1])
        y = native.small_matmul(x2, w, packed=packed)
    elif packed:
        raise ValueError(f"packed weights {w.shape} {w.dtype} need lm.native's kernel")
    else:
        y = jax.lax.dot_general(
            x2.astype(dtype), w.astype(dtype), (((1,), (0,)), ((), ())),
            preferred_element_type=jnp.float32,
        )  # fmt: skip
    y = y.astype(dtype).reshape(*lead, w.shape[-1])
    return y if residual is None else y + residual.astype(dtype)


class Dense(nn.Module):
    """y = x W + b, W: [in, out], with an optional LoRA update (Hu et al. 2021).

    LoRA adds (x A B) * alpha / r with A: [in, r] random and B: [r, out] zero-initialized, so a
    freshly added adapter leaves the model unchanged. Only ``lora_a``/``lora_b`` are trained when
    LoRA is on (the optimizer masks the rest).
    """

    features: int
    axes: tuple[str, str]
    use_bias: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    matmul_impl: str = "xla"  # see matmul
    packed: bool = False  # the kernel is in lm.native.pack's layout (decoding; see matmul)

    @nn.compact
    def __call__(
        self, x: Array, deterministic: bool = True, residual: Array | None = None
    ) -> Array:
        """x W + b (+ LoRA) (+ ``residual``: a skip connection, added inside the product where
        lm.native computes it, i.e. with no bias or LoRA to add first)."""
        pdt = dtype_of(self.param_dtype)
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(_kernel_init(), self.axes),
            (x.shape[-1], self.features),
            pdt,
        )
        fused = not self.use_bias and not self.lora_rank
        y = matmul(
            x, kernel, dtype_of(self.dtype), self.matmul_impl, residual if fused else None,
            self.packed,
        )  # fmt: skip
        if fused:
            residual = None
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:]),
                (self.features,),
                pdt,
            )
            y = y + bias.astype(y.dtype)
        if self.lora_rank:
            a = self.param(
                "lora_a",
                nn.with_logical_partitioning(
                    nn.initializers.normal(1.0 / math.sqrt(x.shape[-1])), (self.axes[0], None)
                ),
                (x.shape[-1], self.lora_rank),
                pdt,
            )
            b = self.param(
                "lora_b",
                nn.with_logical_partitioning(nn.initializers.zeros, (None, self.axes[1])),
                (self.lora_rank, self.features),
                pdt,
            )
            h = Dropout(self.lora_dropout)(x, deterministic=deterministic)
            dt, impl = dtype_of(self.dtype), self.matmul_impl
            lora = matmul(matmul(h, a, dt, impl), b, dt, impl)
            y = y + lora * (self.lora_alpha / self.lora_rank)
        return y if residual is None else y + residual.astype(y.dtype)


def native_projections(
    module: nn.Module,
    cfg: ModelConfig,
    x: Array,
    names: tuple[str, ...],
    use_bias: bool,
    gated: bool = False,
) -> list[Array] | None:
    """x @ W for the Dense children ``names`` of ``module`` in one lm.native call (decoding:
    q/k/v, or gate/up, read in one pass over their weights), or None where that does not apply:
    XLA matmuls, LoRA on one of them, or initialization. ``gated`` (names gate and up, no
    biases): [silu(x @ W_gate) * (x @ W_up)] instead, the SwiGLU hidden layer in one call."""
    if cfg.matmul_impl != "native" or module.is_initializing():
        return None
    if cfg.lora_rank and set(names) & set(cfg.lora_targets):
        return None
    x2 = x.reshape(-1, x.shape[-1])
    params = module.variables["params"]
    ws = [params[n]["kernel"] for n in names]
    if not native.fits_matmul(x2.shape[0], *ws):
        return None
    dt = dtype_of(cfg.dtype)
    if gated:
        h = native.gated_matmul(x2, *ws, packed=cfg.packed_weights).astype(dt)
        return [h.reshape(*x.shape[:-1], h.shape[-1])]
    out = []
    for n, y in zip(names, native.small_matmuls(x2, ws, packed=cfg.packed_weights)):
        y = y.astype(dt)  # as Dense: the product in dtype, then the bias
        if use_bias:
            y = y + params[n]["bias"].astype(dt)
        out.append(y.reshape(*x.shape[:-1], y.shape[-1]))
    return out


def last_rows(x: Array, last_only: bool) -> Array:
    """x [B, T, ...], or its last position [B, 1, ...] when only that one is needed."""
    return x[:, -1:] if last_only else x


def dense(cfg: ModelConfig, features: int, axes, name: str, use_bias: bool) -> Dense:
    """A Dense inside a block, with LoRA when ``name`` is one of ``cfg.lora_targets``."""
    lora = cfg.lora_rank if name in cfg.lora_targets else 0
    return Dense(
        features,
        axes,
        use_bias,
        cfg.dtype,
        cfg.param_dtype,
        lora,
        cfg.lora_alpha,
        cfg.lora_dropout,
        cfg.matmul_impl,
        cfg.packed_weights,
        name=name,
    )


class Embed(nn.Module):
    """Lookup table [V, D]; ``attend`` is the tied output projection (logits = x E^T)."""

    num: int
    features: int
    dtype: str = "float32"
    param_dtype: str = "float32"
    # Small tables (positions, token types) are not split along their rows: ("table", "embed").
    axes: tuple[str, str] = ("vocab", "embed")

    def setup(self):
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(_kernel_init(), self.axes),
            (self.num, self.features),
            dtype_of(self.param_dtype),
        )

    def __call__(self, ids: Array) -> Array:
        return jnp.take(self.embedding, ids, axis=0).astype(dtype_of(self.dtype))

    def attend(self, x: Array) -> Array:
        # [B, T, D] x [V, D] -> [B, T, V], float32 logits for a stable softmax/loss; a 2-D
        # product as in ``matmul``.
        y = jax.lax.dot_general(
            x.reshape(-1, x.shape[-1]).astype(dtype_of(self.dtype)),
            self.embedding.astype(dtype_of(self.dtype)),
            (((1,), (1,)), ((), ())),
            preferred_element_type=jnp.float32,
        )
        return y.reshape(*x.shape[:-1], self.num)


class Norm(nn.Module):
    """LayerNorm (Ba et al. 2016) or RMSNorm (Zhang & Sennrich 2019), computed in float32."""

    kind: str
    eps: float
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        pdt = dtype_of(self.param_dtype)
        d = x.shape[-1]
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (d,), pdt
        )
        x32 = x.astype(jnp.float32)
        if self.kind == "rmsnorm":
            y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + self.eps)
            # HF Llama casts back to the input dtype before the scale; identical in float32.
            return (scale.astype(jnp.float32) * y).astype(dtype_of(self.dtype))
        bias = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (d,), pdt
        )
        mean = jnp.mean(x32, -1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), -1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(
            dtype_of(self.dtype)
        )


def rope_inv_freq(cfg: ModelConfig) -> Array:
    """Inverse frequencies [H/2] of RoPE (Su et al. 2021), with linear or llama3 scaling."""
    h = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    scaling = cfg.rope_scaling_dict
    if not scaling:
        return inv
    kind = scaling.get("type", scaling.get("rope_type"))
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv / factor
    if kind == "llama3":
        # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, and the band in
        # between interpolated smoothly (transformers `_compute_llama3_parameters`).
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling.get("original_max_len", 8192))
        wavelen = 2 * math.pi / inv
        low_wavelen, high_wavelen = old_len / low, old_len / high
        scaled = jnp.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(medium, smoothed, scaled)
    raise ValueError(f"Unsupported rope_scaling type {kind!r}; supported: linear, llama3")


def rope_angles(positions: Array, inv_freq: Array) -> tuple[Array, Array]:
    """The cosines and sines [B, T, H/2] float32 of positions [B, T] times inv_freq [H/2]."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    # The barrier keeps cos/sin as tables: fused into their consumer, XLA:CPU evaluated them
    # once per element of x, i.e. N times over.
    return jax.lax.optimization_barrier((jnp.cos(freqs), jnp.sin(freqs)))


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate x [B, T, N, H] by the angles of rope_angles, HF's rotate-half layout (not
    interleaved): x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x2, x1] =
    roll(x, H/2) * [-1, 1]. (This form, no split/concatenate of x, took 1.0 ms against 1.7 ms
    for q of a 512-token SmolLM2 prefill.)"""
    cos = jnp.concatenate([cos, cos], axis=-1)[:, :, None, :]  # [B, T, 1, H]
    sin = jnp.concatenate([-sin, sin], axis=-1)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    out = x32 * cos + jnp.roll(x32, x.shape[-1] // 2, axis=-1) * sin
    return out.astype(x.dtype)


class Attention(nn.Module):
    """Multi-head / grouped-query attention with an optional KV cache.

    Cache layout per layer: ``{"k": [B, K, H, S], "v": [B, K, S, H]}``; new keys/values for the
    T query tokens are written at slots ``[index, index + T)``.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        x: Array,  # [B, T, D]
        rope: tuple[Array, Array] | None,  # rope_angles: cos, sin [B, T, H/2]; None: no RoPE
        mask: Array,  # [B, 1, T, S] bool: may query t attend key s
        cache: dict | None = None,
        index: Array | None = None,
        deterministic: bool = True,
        projected: Array | None = None,  # [B, T, (N + 2K) H]: x @ [Wq Wk Wv] from the caller
        last_only: bool = False,  # output [B, 1, D] of position T - 1 only (see Transformer)
        residual: Array | None = None,  # added to the output (the block's skip connection)
    ) -> tuple[Array, dict | None]:
        cfg = self.cfg
        b, t, _ = x.shape
        n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        if projected is not None:
            if self._native_qkv_fits(projected, rope, cache, deterministic):
                # The kernel reads q, k and v inside the fused projection and writes their
                # gradients into one array: no slices or concatenation of them in the step.
                out = native.train_attention_qkv(projected, mask, n, k)
                return self._out(
                    last_rows(out.reshape(b, t, n * h), last_only), deterministic, residual
                ), cache
            fused = jnp.split(projected, [n * h, (n + k) * h], axis=-1)
        else:
            fused = native_projections(self, cfg, x, ("q", "k", "v"), cfg.qkv_bias)
        if fused:
            q, kk, v = fused
        else:
            q = dense(cfg, n * h, ("embed", "heads"), "q", cfg.qkv_bias)(x, deterministic)
            kk = dense(cfg, k * h, ("embed", "kv"), "k", cfg.qkv_bias)(x, deterministic)
            v = dense(cfg, k * h, ("embed", "kv"), "v", cfg.qkv_bias)(x, deterministic)
        q, kk, v = q.reshape(b, t, n, h), kk.reshape(b, t, k, h), v.reshape(b, t, k, h)
        if cache is not None and (kernel := self._native_kernel(q, cache["k"], mask, index)):
            out, cache = kernel(q, kk, v, mask, cache, index, rope)
            out = last_rows(out.astype(q.dtype).reshape(b, t, n * h), last_only)
            return self._out(out, deterministic, residual), cache
        if rope is not None:
            q, kk = apply_rope(q, *rope), apply_rope(kk, *rope)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", None))
        if cache is not None:
            out, cache = self._cached_attention(q, kk, v, mask, cache, index)
        elif cfg.attn_dropout_rate > 0 and not deterministic:
            out = self._attention_with_dropout(q, kk, v, mask)
        else:
            impl = _impl(cfg)
            if impl == "cudnn":
                out = fused_attention(q, kk, v, mask, cfg.causal, impl)
            elif impl == "native" and native.available() and native.train_fits(q, kk):
                # lm.native's fused attention and gradient (short sequences, float32): XLA's
                # ops took ~20 ms of the ~70 ms Shakespeare step (T = 64).
                out = native.train_attention(q, kk, v, mask)
            elif impl in ("xla", "native"):  # "native" without the kernel: the same results
                # Not jax.nn.dot_product_attention's XLA path: its softmax divides the [T, S]
                # probabilities and reduces them again in the backward pass. Shakespeare's
                # train step (4 layers, T = 64): 76.6 against 79.4 ms, medians of 5 rounds.
                out = dot_attention(q, kk.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3), mask)
            else:
                out = jax.nn.dot_product_attention(q, kk, v, mask=mask, implementation=impl)
        out = last_rows(out.reshape(b, t, n * h), last_only)
        return self._out(out, deterministic, residual), cache

    def _native_qkv_fits(self, qkv: Array, rope, cache, deterministic: bool) -> bool:
        """Whether the fused projection goes to native.train_attention_qkv as it is: training
        self-attention without RoPE (rotated q and k are new arrays anyway), cache or
        attention dropout, through attention_impl "native" where the kernel fits."""
        cfg = self.cfg
        b, t, _ = qkv.shape
        q = jax.ShapeDtypeStruct((b, t, cfg.num_heads, cfg.head_dim), qkv.dtype)
        kk = jax.ShapeDtypeStruct((b, t, cfg.num_kv_heads, cfg.head_dim), qkv.dtype)
        return (
            rope is None
            and cache is None
            and not (cfg.attn_dropout_rate > 0 and not deterministic)
            and _impl(cfg) == "native"
            and native.available()
            and native.train_fits(q, kk)
        )

    def _out(self, x: Array, deterministic: bool, residual: Array | None) -> Array:
        cfg = self.cfg
        o = dense(cfg, cfg.d_model, ("heads", "embed"), "o", cfg.out_bias)
        return o(x, deterministic, residual)

    def _cached_attention(self, q, kk, v, mask, cache, index):
        """Attention through the KV cache. The cache keeps keys as [B, K, H, S] and values as
        [B, K, S, H], the layouts in which both products are plain batched matmuls (XLA
        transposed a [B, S, K, H] cache in full on every decoding step: 40% of a batch-16
        SmolLM2 step on CPU)."""
        kk, v = kk.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)  # [B, K, H, T], [B, K, T, H]
        ck = jax.lax.dynamic_update_slice(cache["k"], kk.astype(cache["k"].dtype), (0, 0, 0, index))
        cv = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, 0, index, 0))
        if isinstance(index, int) and index == 0:
            # Prefill of an empty cache (index is the Python int 0, see Transformer): the only
            # visible keys are the T new ones, so attend to them, not to all S slots.
            out = prefill_attention(q, kk, v, mask[..., : q.shape[1]], self.cfg.causal)
        else:
            out = dot_attention(q, ck.astype(q.dtype), cv.astype(q.dtype), mask)
        return out, {"k": ck, "v": cv}

    def _native_kernel(self, q, ck, mask, index):
        """lm.native's attention for this cached call, or None (XLA's ops). The kernels
        rotate q and k by RoPE themselves, write the cache, and attend."""
        if self.cfg.matmul_impl != "native" or not native.fits(0, ck):
            return None
        if q.shape[1] == 1 and mask.shape[1] == 1 and native.fits(q.shape[0], ck):
            return _native_step
        if isinstance(index, int) and index == 0 and q.shape[1] > 1:
            return _native_prefill
        return None

    def _attention_with_dropout(self, q, k, v, mask):
        # Explicit softmax so attention probabilities can be dropped (BERT fine-tuning recipe);
        # jax.nn.dot_product_attention has no dropout.
        cfg = self.cfg
        g = cfg.num_heads // cfg.num_kv_heads
        k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
        s = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32)
        s = s / math.sqrt(cfg.head_dim)
        s = jnp.where(mask, s, jnp.finfo(jnp.float32).min)
        p = jax.nn.softmax(s, axis=-1)
        p = Dropout(cfg.attn_dropout_rate)(p, deterministic=False)
        return jnp.einsum("bnts,bsnh->btnh", p.astype(v.dtype), v).astype(q.dtype)


def _native_step(q, kk, v, mask, cache, index, rope):
    """One token per row (a decoding step): lm.native's kernel writes the new key and value
    into the cache and reads each row's keys and values once, instead of XLA's two slice
    updates, B * KV tiny products and five softmax ops."""
    cos, sin = (a[:, 0] for a in rope) if rope is not None else (None, None)
    out, ck, cv = native.decode_attention(
        q[:, 0], kk[:, 0], v[:, 0], cache["k"], cache["v"], index, mask[:, 0, 0], cos, sin
    )
    return out[:, None], {"k": ck, "v": cv}


def _native_prefill(q, kk, v, mask, cache, index, rope):
    """A prompt into an empty cache: lm.native's kernel writes the keys and values and attends
    in cache-sized tiles, reading keys only up to each token's last visible one (through XLA's
    ops and copies, a third of a 512-token SmolLM2 prefill)."""
    t = q.shape[1]
    cos, sin = rope if rope is not None else (None, None)
    out, ck, cv = native.prefill_attention(
        q, kk, v, cache["k"], cache["v"], index, mask[:, 0, :, :t], cos, sin
    )
    return out, {"k": ck, "v": cv}


def dot_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """Softmax attention (Vaswani et al. 2017) with grouped-query heads, as plain XLA ops.

    The softmax is normalized on the output instead of the probabilities: ``(exp(s - m) v) / l``
    with ``l`` the row sums, one divide over [B, T, N, H] instead of one over the [B, N, T, S]
    scores (and none of it in the backward pass); the row maximum ``m`` is a constant of the
    gradient (softmax does not depend on it). Queries are scaled before the product, a
    [T, H] multiply instead of a [T, S] one. Same results as jax.nn.dot_product_attention's
    XLA path to float32 rounding; rows without any visible key give the mean of the values.

    Args:
        q: [B, T, N, H]; k: [B, K, H, S]; v: [B, K, S, H]; N a multiple of K;
        mask: [B, 1, T, S] bool.

    Returns:
        [B, T, N, H] in q's dtype.
    """
    b, t, n, h = q.shape
    kh, s_len = k.shape[1], k.shape[3]
    g = n // kh
    # Queries grouped by their KV head, [B, K, G*T, H]: both products are plain batched
    # matmuls over (B, K) (also the form XLA:CPU runs for bfloat16 with float32 results).
    q = q * jnp.asarray(1.0 / math.sqrt(h), q.dtype)
    q = q.reshape(b, t, kh, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kh, g * t, h)
    s = jnp.einsum("bkqh,bkhs->bkqs", q, k, preferred_element_type=jnp.float32)
    s = s.reshape(b, kh, g, t, s_len)
    s = jnp.where(mask[:, :, None], s, jnp.finfo(jnp.float32).min)  # mask: [B, 1, 1, T, S]
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    p = jnp.exp(s - m)  # [B, K, G, T, S]
    denom = jnp.sum(p, axis=-1, keepdims=True)  # [B, K, G, T, 1]
    p = p.astype(v.dtype).reshape(b, kh, g * t, s_len)
    o = jnp.einsum("bkqs,bksh->bkqh", p, v, preferred_element_type=jnp.float32)
    o = o.reshape(b, kh, g, t, h) / denom
    return o.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q.dtype)


PREFILL_BLOCK = 128  # query rows per block of a long causal prefill


def prefill_attention(q: Array, k: Array, v: Array, mask: Array, causal: bool) -> Array:
    """Attention of T new tokens to themselves (layouts as dot_attention, S == T).

    A long causal prompt is cut into blocks of PREFILL_BLOCK queries, block i attending to
    keys [0, (i + 1) * PREFILL_BLOCK) only: the keys after a block's last query are masked for
    all of its rows anyway, so this skips the upper triangle (about half the scores) and keeps
    each block's scores in cache. Measured on a 512-token SmolLM2 prompt (2-core CPU): 3.2 ms a
    layer against 7.9 ms for one [512, 512] product. Identical on every row that sees at least
    one key; a padding row that sees none averages its block's values instead of all of them
    (such rows are never read).
    """
    t = q.shape[1]
    if not causal or t < 2 * PREFILL_BLOCK or t % PREFILL_BLOCK:
        return dot_attention(q, k, v, mask)
    outs = []
    for start in range(0, t, PREFILL_BLOCK):
        end = start + PREFILL_BLOCK
        outs.append(
            dot_attention(q[:, start:end], k[..., :end], v[:, :, :end], mask[:, :, start:end, :end])
        )
    return jnp.concatenate(outs, axis=1)


def fused_attention(q: Array, k: Array, v: Array, mask: Array, causal: bool, impl: str) -> Array:
    """Flash attention with its built-in mask where the dense mask is exactly that pattern.

    cuDNN's fused kernel (Dao 2023) skips masked tiles only for its own mask types (causal,
    per-row key lengths); a dense [B, 1, T, S] mask becomes a bias tensor it reads in full on
    every layer. When ``mask`` is "causal (or not) + right padding, no packing" (checked on the
    device, one scalar), the fast form runs; otherwise the dense mask does. Same results, except
    on rows without any real key (padding rows: never read, zero loss weight).

    Args:
        q: [B, T, N, H]; k, v: [B, S, K, H] with S == T (no KV cache); mask: [B, 1, T, S] bool.
    """
    b, _, t, s = mask.shape
    row = mask[:, 0, -1, :] if causal else mask[:, 0, 0, :]  # [B, S]: the keys of the last row
    lengths = jnp.sum(row, axis=-1, dtype=jnp.int32)  # [B]
    keys = jnp.arange(s)
    standard = keys[None, None, :] < lengths[:, None, None]  # [B, 1, S]
    if causal:
        standard = standard & (keys[None, None, :] <= jnp.arange(t)[None, :, None])  # [B, T, S]
    is_standard = jnp.all(mask[:, 0] == standard)

    def fast(q, k, v, mask):
        return jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, key_value_seq_lengths=jnp.maximum(lengths, 1),
            implementation=impl,
        )  # fmt: skip

    def dense(q, k, v, mask):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)

    return jax.lax.cond(is_standard, fast, dense, q, k, v, mask)


def _impl(cfg: ModelConfig):
    return None if cfg.attention_impl in ("auto", None) else cfg.attention_impl


def activation(name: str):
    return {
        "silu": jax.nn.silu,
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "relu": jax.nn.relu,
    }[name]


class MLP(nn.Module):
    """Gated (SwiGLU, Shazeer 2020: down(act(gate x) * up x)) or plain (down(act(up x)))."""

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self, x: Array, deterministic: bool = True, residual: Array | None = None
    ) -> Array:
        cfg = self.cfg
        act = activation(cfg.activation)
        gated = cfg.mlp == "gated" and cfg.activation == "silu" and not cfg.mlp_bias
        fused = cfg.mlp == "gated" and native_projections(
            self, cfg, x, ("gate", "up"), cfg.mlp_bias, gated=gated
        )
        if fused and gated:
            [h] = fused
        elif fused:
            gate, up = fused
            h = act(gate) * up
        else:
            up = dense(cfg, cfg.mlp_dim, ("embed", "mlp"), "up", cfg.mlp_bias)(x, deterministic)
            if cfg.mlp == "gated":
                gate = dense(cfg, cfg.mlp_dim, ("embed", "mlp"), "gate", cfg.mlp_bias)(
                    x, deterministic
                )
                h = act(gate) * up
            else:
                h = act(up)
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        down = dense(cfg, cfg.d_model, ("mlp", "embed"), "down", cfg.mlp_bias)
        return down(h, deterministic, residual)


def _native_block(module: nn.Module, cfg: ModelConfig, deterministic: bool, names) -> dict | None:
    """The parameters of a pre-norm Block (``module``) for lm.native's fused training calls,
    or None where they do not apply: ``block_impl`` not "native", initialization, decoding
    (``matmul_impl="native"``), anything but float32, LoRA on one of the Dense ``names``,
    dropout in training, or the kernels unavailable."""
    if cfg.block_impl != "native" or module.is_initializing() or cfg.matmul_impl == "native":
        return None
    if (
        cfg.norm not in native.BLOCK_NORMS
        or cfg.dtype != "float32"
        or cfg.param_dtype != "float32"
        or (cfg.lora_rank and set(names) & set(cfg.lora_targets))
        or (cfg.dropout_rate and not deterministic)
        or not native.available()
    ):
        return None
    return module.variables["params"]


def native_qkv(module: nn.Module, cfg: ModelConfig, x: Array, deterministic: bool):
    """attn_norm(x) @ [Wq Wk Wv] of a pre-norm Block in one lm.native call with its gradient
    ([B, T, (N + 2K) H]: q, k, v side by side, Attention's ``projected``), or None (see
    _native_block; also q/k/v biases and attention dropout in training)."""
    if cfg.qkv_bias or (cfg.attn_dropout_rate and not deterministic):
        return None
    p = _native_block(module, cfg, deterministic, ("q", "k", "v"))
    if p is None:
        return None
    norm, attn = p["attn_norm"], p["attn"]
    ws = [attn[n]["kernel"] for n in ("q", "k", "v")]
    return native.train_norm_dense(
        x.astype(jnp.float32), norm["scale"], norm.get("bias"), jnp.concatenate(ws, axis=1),
        cfg.norm, cfg.norm_eps,
    )  # fmt: skip


def native_mlp_block(module: nn.Module, cfg: ModelConfig, x: Array, deterministic: bool):
    """``x + mlp(mlp_norm(x))`` of a pre-norm Block in lm.native.train_mlp's fused call with
    its gradient, or None (see _native_block; also a gated MLP, MLP biases, or an activation
    the kernel lacks)."""
    if cfg.mlp != "plain" or cfg.mlp_bias or cfg.activation not in native.MLP_ACTIVATIONS:
        return None
    p = _native_block(module, cfg, deterministic, ("up", "down"))
    if p is None:
        return None
    norm, mlp = p["mlp_norm"], p["mlp"]
    return native.train_mlp(
        x.astype(jnp.float32), norm["scale"], norm.get("bias"), mlp["up"]["kernel"],
        mlp["down"]["kernel"], cfg.norm, cfg.activation, cfg.norm_eps,
    )  # fmt: skip


def attention_mask(
    kv_valid: Array,  # [B, S] int/bool: real (non-padding) keys
    causal: bool,
    q_pos: Array,  # [B, T] or [T]: slot of each query in the key sequence
    q_segments: Array | None = None,  # [B, T] packed-example ids (0 = padding)
    kv_segments: Array | None = None,  # [B, S]
) -> Array:
    """Boolean mask [B, 1, T, S]: key s is visible from query t.

    Rows that end up empty (a padding query before every real key) are harmless:
    jax.nn.dot_product_attention fills masked logits with a large finite negative, so such rows
    give a uniform softmax instead of NaN, and their outputs are never read.
    """
    m = kv_valid.astype(bool)[:, None, None, :]
    if causal:
        s = kv_valid.shape[1]
        q_pos = jnp.broadcast_to(q_pos, (kv_valid.shape[0], jnp.shape(q_pos)[-1]))
        m = m & (jnp.arange(s)[None, None, None, :] <= q_pos[:, None, :, None])
    if q_segments is not None:
        m = m & (q_segments[:, None, :, None] == kv_segments[:, None, None, :])
    return m


def constrain(x: Array, axes: Sequence[str | None]) -> Array:
    return nn.with_logical_constraint(x, tuple(axes))
