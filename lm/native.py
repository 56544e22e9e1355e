"""Native CPU kernels (``lm/csrc/small_matmul.cc``): for decoding, the few-row matrix products,
the attention of one new token to the KV cache and a prompt's attention (the prefill); for
training, attention with its gradient on short sequences (``attention_impl="native"``) and a
pre-norm block's norm + q/k/v projections and norm + MLP + residual with their gradients
(``block_impl="native"``).

    from lm import native
    if native.available():
        y = native.small_matmul(x, w)          # x [M, K] f32, w [K, N] f32|bf16 -> [M, N] f32
        y = native.small_matmul(x, e, True)    # e [N, K]: the tied LM head, x @ e.T
        h = native.gated_matmul(x, wg, wu)     # silu(x @ wg) * (x @ wu), SwiGLU's hidden layer
        y = native.small_matmul(x, native.pack(w), packed=True)  # w in decoding's panel layout
        o, k, v = native.decode_attention(q, k_new, v_new, k, v, index, mask, cos, sin)
        o, k, v = native.prefill_attention(q, k_new, v_new, k, v, 0, mask, cos, sin)
        o = native.train_attention(q, k, v, mask)   # differentiable, short float32 sequences
        o = native.train_attention_qkv(qkv, mask, heads, kv_heads)  # q, k, v fused [B, T, .]
        y = native.train_mlp(x, scale, bias, w1, w2, "layernorm", "gelu_tanh", 1e-5)
        qkv = native.train_norm_dense(x, scale, bias, w_qkv, "layernorm", 1e-5)

Why: a decoding step at batch 1 reads every weight once, so its speed is the rate at which
the weights stream from memory. XLA:CPU widens bfloat16 weights through memory before its
dot (a batch-1 bfloat16 matrix-vector product took 10x the float32 time: 1.3 GB/s of
weights), so bfloat16 weights made decoding slower instead of twice as fast. The kernel
reads W once, in contiguous row blocks, widening bfloat16 to float32 in registers, on the
calling thread plus XLA's intra-op pool. Measured on the 2-core AVX-512 machine (30 matrices
of 576 x 1536, one row): float32 4.1 ms (XLA 4.2), bfloat16 3.2 ms (XLA 32 ms; 6.9 ms at two
rows, the old workaround). From 5 rows the kernel switches to register tiles of 8 rows x 48
columns: 16 rows of float32 at 12-13 GB/s against XLA's 10 (batch-16 SmolLM2 decoding,
matmuls only through the kernel: 205-212 tok/s against 177 through XLA, same host phase);
bfloat16 matmuls at 16 rows are no faster than XLA's (both ~160 tok/s before the attention
step moved here too). Products of more rows (a prompt's prefill) copy W into 48-column panels
and run the same 8 x 48 register tiles over them (``fits_matmul``): in float32 about XLA's own
GEMM rate (side by side in one process at 512 rows, 2 threads: 175-224 GFLOP/s, XLA's dot
186-209, PyTorch's oneDNN 243-263), but bfloat16 weights are widened in the copy, once, where
XLA's dot widened them through memory (a 512-token SmolLM2 prefill in bfloat16: 0.63 s against
0.98), and an MLP's silu(x Wg) * (x Wu) leaves the kernel as one array (``gated_matmul``). The
prefill's attention is here:
through XLA's ops and copies it took a third of a 512-token SmolLM2 prefill (0.3 s of 0.9).
Both attention kernels apply RoPE to q and k themselves (the tables come from
``lm.layers.rope_angles``), which removes XLA's elementwise RoPE ops from every layer.

On AVX2 hosts (no AVX-512) lm.decode hands the kernel packed weights (``pack``, ``packs``):
each 24-column panel of W stored whole, streamed front to back through 4 x 24 register tiles,
128 rows of the panel at a time. SmolLM2 on a 2-core Zen 3, lm only, packed and row-major
alternated call by call (3 rounds, 128 new tokens, whole panels): batch 16 float32 245
against 212 tok/s (1.16x), bfloat16 357 against 280 (1.28x); batch 1 bfloat16 57.8 against
48.9 (1.18x), float32 and the 512-token prefill within 2-3%; the 128-row blocks added ~9% at
batch 16. Float32 prefills run the same tiles over whole panels (0.73 against 0.80 s);
bfloat16 ones copy the packed panels into gemm_many's.

The kernels are written once against ``lm/csrc/simd.h``'s 16-lane vectors: one AVX-512
register, or two AVX2 registers on CPUs without AVX-512 (AMD Zen, older Intel), where the
register tiles are smaller (16 registers instead of 32). The numbers above are from the
AVX-512 machine; on a 2-core AMD EPYC (Zen 3, AVX2) see the README's benchmark section.

The source is compiled on first use with the system C++ compiler against jaxlib's FFI headers
(``-O3 -march=native``: ~6 s on the Ice Lake machine, ~40 s on the AMD one) into
``$LM_NATIVE_CACHE`` (default ``~/.cache/lm/native``), keyed by the sources, jaxlib version
and CPU. Without a compiler, without AVX-512 (F, BW, VL) or AVX2 + FMA, off the CPU backend,
or with ``LM_NATIVE=0``, ``available()`` is false and everything runs through XLA, with the
same results up to float32 rounding.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

DTYPES = (jnp.float32, jnp.bfloat16)  # weight dtypes the kernel reads
# Decoding steps' attention and the transposed head ([V, D] rows read whole: 1.2-1.4x XLA up
# to 16 rows) take at most this many rows (``fits``); products x @ W [K, N] take any number,
# more than this going to the packed-panel GEMM (``fits_matmul``).
MAX_ROWS = 16
TARGET = "lm_small_matmul"
ATTENTION_TARGET = "lm_decode_attention"
PREFILL_TARGET = "lm_prefill_attention"
# Forward (separate or fused q/k/v), backward to dq, dk, dv, backward to the fused dqkv.
TRAIN_TARGETS = ("lm_train_attention_fwd", "lm_train_attention_bwd", "lm_train_attention_qkv_bwd")
MLP_TARGETS = ("lm_train_mlp_fwd", "lm_train_mlp_bwd")
NORM_DENSE_TARGETS = ("lm_norm_dense_fwd", "lm_norm_dense_bwd")
BLOCK_NORMS = ("layernorm", "rmsnorm")  # what train_mlp's and train_norm_dense's kernels use
MLP_ACTIVATIONS = ("gelu_tanh", "relu")
# Training attention holds a task's [T * G, S] probabilities and copies in cache-sized
# buffers: longer sequences stay with XLA (lm.layers.dot_attention).
TRAIN_MAX_SCORES = 64 * 1024
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "small_matmul.cc")
HEADERS = (os.path.join(os.path.dirname(SOURCE), "simd.h"),)  # included by SOURCE
# Either instruction set suffices (lm/csrc/simd.h): AVX-512 runs 16 lanes an instruction with
# 32 registers, AVX2 + FMA (AMD Zen, Intel before Skylake-X) 8 lanes with 16.
AVX512_FLAGS = ("avx512f", "avx512bw", "avx512vl")
AVX2_FLAGS = ("avx2", "fma")


def isa() -> str | None:
    """The instruction set the kernels compile for on this CPU: "avx512", "avx2" or None."""
    flags = _cpu_flags()
    if set(AVX512_FLAGS) <= flags:
        return "avx512"
    if set(AVX2_FLAGS) <= flags:
        return "avx2"
    return None


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The CPU's flags, read once: ``packs()`` asks on every ``lm.decode.generate`` call."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _cache_dir() -> str:
    return os.environ.get("LM_NATIVE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "lm", "native"
    )


def _library_path() -> str:
    """Where the compiled library for this source, jaxlib and CPU lives."""
    import jaxlib

    key = hashlib.sha256()
    for name in (SOURCE, *HEADERS):
        with open(name, "rb") as f:
            key.update(f.read())
    key.update(jaxlib.__version__.encode())
    key.update(" ".join(sorted(_cpu_flags())).encode())
    return os.path.join(_cache_dir(), f"small_matmul-{key.hexdigest()[:16]}.so")


def _build(path: str) -> None:
    """Compile SOURCE into ``path`` (written to a temporary name, then renamed: several
    processes building at once each get a whole library)."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise RuntimeError("no C++ compiler (g++/c++, or $CXX) on PATH")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    os.close(fd)
    cmd = [
        cxx, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w",
        f"-I{jax.ffi.include_dir()}", SOURCE, "-o", tmp,
    ]  # fmt: skip
    try:
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def available() -> bool:
    """True when the kernel is built, loaded and registered with XLA (once per process)."""
    if os.environ.get("LM_NATIVE", "1") == "0":
        return False
    if jax.default_backend() != "cpu" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    if isa() is None:
        return False
    path = _library_path()
    try:
        if not os.path.exists(path):
            _build(path)
        lib = ctypes.cdll.LoadLibrary(path)
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.LmSmallMatmul), platform="cpu")
        jax.ffi.register_ffi_target(
            ATTENTION_TARGET, jax.ffi.pycapsule(lib.LmDecodeAttention), platform="cpu"
        )
        jax.ffi.register_ffi_target(
            PREFILL_TARGET, jax.ffi.pycapsule(lib.LmPrefillAttention), platform="cpu"
        )
        fns = (lib.LmTrainAttentionFwd, lib.LmTrainAttentionBwd, lib.LmTrainAttentionQkvBwd,
               lib.LmTrainMlpFwd, lib.LmTrainMlpBwd, lib.LmNormDenseFwd, lib.LmNormDenseBwd)  # fmt: skip
        for target, fn in zip(TRAIN_TARGETS + MLP_TARGETS + NORM_DENSE_TARGETS, fns):
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(fn), platform="cpu")
    except (OSError, RuntimeError) as e:
        log.warning("lm.native: the kernels are unavailable, XLA runs their work (%s)", e)
        return False
    return True


# Columns of a panel of packed weights (lm/csrc/small_matmul.cc's kPackCols).
PACK_COLS = 24


def packs() -> bool:
    """Whether decoding should give the few-row products packed weights (``pack``): on AVX2
    hosts, where the kernel's 4 x 24 register tiles stream each panel whole (SmolLM2 at batch
    16: the products ~1.5x faster than from row-major W). AVX-512 hosts keep row-major W and
    their 8 x 48 tiles. ``LM_PACK=0`` or ``1`` overrides."""
    env = os.environ.get("LM_PACK")
    if env in ("0", "1"):
        return env == "1" and available()
    return available() and isa() == "avx2"


def pack(w: jax.Array) -> jax.Array:
    """W [..., K, N] in the kernel's packed layout, same shape and dtype: its columns cut into
    panels of PACK_COLS (the last holds N % PACK_COLS when that is not 0), each panel stored
    whole, K rows of its width, one after the other. Only lm.native's products with
    ``packed=True`` read it; ``unpack`` inverts it."""
    *lead, k, n = w.shape
    full = n - n % PACK_COLS
    panels = w[..., :full].reshape(*lead, k, full // PACK_COLS, PACK_COLS)
    parts = [jnp.swapaxes(panels, -3, -2).reshape(*lead, k * full)]
    if full < n:
        parts.append(w[..., full:].reshape(*lead, k * (n - full)))
    return jnp.concatenate(parts, -1).reshape(w.shape)


def unpack(w: jax.Array) -> jax.Array:
    """The row-major W [..., K, N] of ``pack(W)``."""
    *lead, k, n = w.shape
    full = n - n % PACK_COLS
    flat = w.reshape(*lead, k * n)
    panels = flat[..., : k * full].reshape(*lead, full // PACK_COLS, k, PACK_COLS)
    parts = [jnp.swapaxes(panels, -3, -2).reshape(*lead, k, full)]
    if full < n:
        parts.append(flat[..., k * full :].reshape(*lead, k, n - full))
    return jnp.concatenate(parts, -1)


def fits(rows: int, *operands: jax.Array) -> bool:
    """Whether work of ``rows`` rows over these operands (weights, or a KV cache) belongs to the
    kernels: at most MAX_ROWS rows, every operand float32 or bfloat16. The caller also checks
    that decoding chose the kernels (``matmul_impl == "native"``)."""
    return rows <= MAX_ROWS and all(a.dtype in DTYPES for a in operands)


def fits_matmul(rows: int, *ws: jax.Array) -> bool:
    """Whether x [rows, K] @ w [K, N] for these weights belongs to the kernel: any number of
    rows (more than MAX_ROWS, a prompt's prefill, go to its packed-panel GEMM), weights float32
    or bfloat16. The transposed head (``transpose_w``) takes at most MAX_ROWS: use ``fits``."""
    return all(w.dtype in DTYPES for w in ws)


def small_matmul(
    x: jax.Array,
    w: jax.Array,
    transpose_w: bool = False,
    residual: jax.Array | None = None,
    packed: bool = False,
) -> jax.Array:
    """x [M, K] @ w [K, N] (or @ w.T for w [N, K] with ``transpose_w``) as float32 [M, N],
    plus ``residual`` [M, N] when given (a block's skip connection: the products land on it in
    place, so no separate pass adds them; not with ``transpose_w``). ``packed``: w is
    ``pack(W)`` (not with ``transpose_w``).

    x and residual are cast to float32; w must be float32 or bfloat16. Call only when
    ``available()``.
    """
    if residual is not None:
        if transpose_w or residual.shape != (x.shape[0], w.shape[-1]):
            raise ValueError(
                f"small_matmul: residual {residual.shape} must be [M, N] of x {x.shape} @ w "
                f"{w.shape} (not transposed)"
            )
        [y] = _call(x, [w], False, residual=residual.astype(jnp.float32), packed=packed)
        return y
    [y] = _call(x, [w], transpose_w, packed=packed)
    return y


def small_matmuls(x: jax.Array, ws: list[jax.Array], packed: bool = False) -> list[jax.Array]:
    """[x @ w for w in ws] in one call (q/k/v or gate/up: one thread handoff, not three)."""
    return _call(x, list(ws), False, packed=packed)


def gated_matmul(
    x: jax.Array, w_gate: jax.Array, w_up: jax.Array, packed: bool = False
) -> jax.Array:
    """silu(x @ w_gate) * (x @ w_up) as float32 [M, N] (a SwiGLU MLP's hidden layer) in one
    call: the two products never leave the kernel (at 512 rows they are 2 x 3 MB a layer that
    XLA's elementwise pass would read back). Weights [K, N] alike in shape and dtype."""
    if w_gate.shape != w_up.shape or w_gate.dtype != w_up.dtype:
        raise ValueError(
            f"gated_matmul: gate {w_gate.shape} {w_gate.dtype} and up {w_up.shape} "
            f"{w_up.dtype} differ"
        )
    [y] = _call(x, [w_gate, w_up], False, gated=True, packed=packed)
    return y


def _call(
    x: jax.Array,
    ws: list[jax.Array],
    transpose_w: bool,
    gated: bool = False,
    residual: jax.Array | None = None,
    packed: bool = False,
) -> list[jax.Array]:
    if packed and transpose_w:
        raise ValueError("small_matmul: packed weights are [K, N], not transposed")
    outs = []
    for w in ws:
        if x.ndim != 2 or w.ndim != 2:
            raise ValueError(f"small_matmul takes 2-D operands, got {x.shape} and {w.shape}")
        if x.shape[1] != (w.shape[1] if transpose_w else w.shape[0]):
            raise ValueError(f"small_matmul: x {x.shape} and w {w.shape} do not contract")
        if w.dtype not in DTYPES:
            raise ValueError(f"small_matmul: w must be float32 or bfloat16, got {w.dtype}")
        n = w.shape[0] if transpose_w else w.shape[1]
        outs.append(jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32))
    extra = [] if residual is None else [residual]
    aliases = {} if residual is None else {1 + len(ws): 0}  # the residual becomes the output
    call = jax.ffi.ffi_call(TARGET, outs[:1] if gated else outs, input_output_aliases=aliases)
    return list(
        call(
            x.astype(jnp.float32),
            *ws,
            *extra,
            transpose_w=transpose_w,
            gated=gated,
            accumulate=residual is not None,
            packed=packed,
        )
    )


def decode_attention(
    q: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    k: jax.Array,
    v: jax.Array,
    index: jax.Array,
    mask: jax.Array,
    cos: jax.Array | None = None,
    sin: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One decoding step of attention: rotate q and the new key by RoPE, write the new key
    and value into cache slot ``index``, then attend every row's token to its cache.

    Args:
        q: [B, N, H] queries (cast to float32), N a multiple of the KV heads.
        k_new, v_new: [B, KV, H], this step's key and value (stored in the cache's dtype).
        k: [B, KV, H, S] and v: [B, KV, S, H], the caches (float32 or bfloat16;
            lm.model.init_cache's layouts), updated in place where XLA can alias them.
        index: int scalar, the slot to write (0 <= index < S).
        mask: [B, S], true where the key may be attended (the new slot included).
        cos, sin: [B, H / 2], the cosines and sines of each row's RoPE angles
            (lm.layers.rope_angles); None: no rotation.

    Returns:
        (out [B, N, H] float32, k, v): softmax(q k / sqrt(H)) v per head, as
        lm.layers.apply_rope then lm.layers.dot_attention compute it over the updated caches
        (to float32 rounding).
        Call only when ``available()``.
    """
    b, n, h = q.shape
    if k.ndim != 4 or v.shape != (k.shape[0], k.shape[1], k.shape[3], k.shape[2]):
        raise ValueError(
            f"decode_attention: k {k.shape} [B, KV, H, S] and v {v.shape} [B, KV, S, H]"
        )
    new = (b, k.shape[1], h)
    if k.shape[0] != b or k.shape[2] != h or n % k.shape[1] or mask.shape != (b, k.shape[3]):
        raise ValueError(
            f"decode_attention: q {q.shape}, k {k.shape} and mask {mask.shape} do not match"
        )
    if k_new.shape != new or v_new.shape != new:
        raise ValueError(f"decode_attention: new k {k_new.shape} and v {v_new.shape}, want {new}")
    if k.dtype not in DTYPES or v.dtype != k.dtype:
        raise ValueError(f"decode_attention: the cache must be float32 or bfloat16, got {k.dtype}")
    cos, sin = _angles("decode_attention", cos, sin, (b,), h)
    call = jax.ffi.ffi_call(
        ATTENTION_TARGET,
        (jax.ShapeDtypeStruct((b, n, h), jnp.float32), k, v),
        input_output_aliases={3: 1, 4: 2},
    )
    return call(
        q.astype(jnp.float32), k_new.astype(jnp.float32), v_new.astype(k.dtype), k, v,
        jnp.asarray(index, jnp.int32), mask.astype(jnp.uint8), cos, sin,
        scale=np.float32(1.0 / math.sqrt(h)),
    )  # fmt: skip


def _angles(name: str, cos, sin, lead: tuple, h: int) -> tuple[jax.Array, jax.Array]:
    """RoPE tables as the kernels take them: float32 [*lead, H / 2], or [*lead, 0] for none."""
    if cos is None and sin is None:
        z = jnp.zeros((*lead, 0), jnp.float32)
        return z, z
    want = (*lead, h // 2)
    if h % 2 or cos is None or sin is None or cos.shape != want or sin.shape != want:
        raise ValueError(
            f"{name}: cos {getattr(cos, 'shape', None)} and sin {getattr(sin, 'shape', None)} "
            f"must both be {want}"
        )
    return cos.astype(jnp.float32), sin.astype(jnp.float32)


def prefill_attention(
    q: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    k: jax.Array,
    v: jax.Array,
    index,
    mask: jax.Array,
    cos: jax.Array | None = None,
    sin: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Attention of T new tokens per row (a prompt's prefill): rotate queries and keys by
    RoPE, write the keys and values into cache slots [index, index + T), then attend each
    token to the first E slots.

    Args:
        q: [B, T, N, H] queries (cast to float32), N a multiple of the KV heads.
        k_new, v_new: [B, T, KV, H], the new keys and values (stored in the cache's dtype).
        k: [B, KV, H, S] and v: [B, KV, S, H], the caches (float32 or bfloat16), updated in
            place where XLA can alias them.
        index: int scalar, the first slot written (0 <= index, index + T <= S).
        mask: [B, T, E] with E <= S, true where token t may attend to slot s. Keys after a
            token's last visible one are not read (a causal mask skips the upper triangle).
        cos, sin: [B, T, H / 2], the cosines and sines of the tokens' RoPE angles
            (lm.layers.rope_angles); None: no rotation.

    Returns:
        (out [B, T, N, H] float32, k, v): as lm.layers.apply_rope then
        lm.layers.dot_attention compute it over the first E slots of the updated caches (to float32 rounding; a token that sees no key
        averages all E values there too). Call only when ``available()``.
    """
    b, t, n, h = q.shape
    if k.ndim != 4 or v.shape != (k.shape[0], k.shape[1], k.shape[3], k.shape[2]):
        raise ValueError(
            f"prefill_attention: k {k.shape} [B, KV, H, S] and v {v.shape} [B, KV, S, H]"
        )
    new = (b, t, k.shape[1], h)
    if (
        k.shape[0] != b
        or k.shape[2] != h
        or n % k.shape[1]
        or mask.ndim != 3
        or mask.shape[:2] != (b, t)
        or not 0 < mask.shape[2] <= k.shape[3]
    ):
        raise ValueError(
            f"prefill_attention: q {q.shape}, k {k.shape} and mask {mask.shape} do not match"
        )
    if k_new.shape != new or v_new.shape != new:
        raise ValueError(f"prefill_attention: new k {k_new.shape} and v {v_new.shape}, want {new}")
    if k.dtype not in DTYPES or v.dtype != k.dtype:
        raise ValueError(f"prefill_attention: the cache must be float32 or bfloat16, got {k.dtype}")
    cos, sin = _angles("prefill_attention", cos, sin, (b, t), h)
    call = jax.ffi.ffi_call(
        PREFILL_TARGET,
        (jax.ShapeDtypeStruct((b, t, n, h), jnp.float32), k, v),
        input_output_aliases={3: 1, 4: 2},
    )
    return call(
        q.astype(jnp.float32), k_new.astype(jnp.float32), v_new.astype(k.dtype), k, v,
        jnp.asarray(index, jnp.int32), mask.astype(jnp.uint8), cos, sin,
        scale=np.float32(1.0 / math.sqrt(h)),
    )  # fmt: skip


def train_fits(q: jax.Array, k: jax.Array) -> bool:
    """Whether training attention of q [B, T, N, H] over k [B, S, KV, H] belongs to the
    kernel: float32, and at most TRAIN_MAX_SCORES scores per (row, KV head)."""
    t, n = q.shape[1], q.shape[2]
    s, kv = k.shape[1], k.shape[2]
    return (
        q.dtype == jnp.float32
        and k.dtype == jnp.float32
        and n % kv == 0
        and t * (n // kv) * s <= TRAIN_MAX_SCORES
    )


@jax.custom_vjp
def train_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention with its gradient, for training on short sequences (float32).

    Args:
        q: [B, T, N, H]; k, v: [B, S, KV, H] with N a multiple of KV (grouped heads).
        mask: [B, 1, T, S] bool, true where query t may attend to key s.

    Returns:
        [B, T, N, H]: what lm.layers.dot_attention computes (to float32 rounding; a query that
        sees no key averages the values there too). Call only when ``available()`` and
        ``train_fits(q, k)``.
    """
    return _train_fwd(q, k, v, mask)[0]


def _heads(n: int, kv: int, h: int) -> dict:
    return dict(scale=np.float32(1.0 / math.sqrt(h)), heads=np.int64(n), kv_heads=np.int64(kv),
                head_dim=np.int64(h))  # fmt: skip


def _train_fwd(q, k, v, mask):
    b, t, n, h = q.shape
    if k.ndim != 4 or v.shape != k.shape or k.shape[0] != b or k.shape[3] != h:
        raise ValueError(f"train_attention: q {q.shape}, k {k.shape} and v {v.shape} do not match")
    if mask.shape != (b, 1, t, k.shape[1]):
        raise ValueError(f"train_attention: mask {mask.shape}, want {(b, 1, t, k.shape[1])}")
    return _attention_call(q, k, v, mask, n, k.shape[2], h, False)


def _attention_call(q, k, v, mask, n, kv, h, fused):
    b, t, s = q.shape[0], q.shape[1], mask.shape[-1]
    call = jax.ffi.ffi_call(
        TRAIN_TARGETS[0],
        (jax.ShapeDtypeStruct((b, t, n, h), jnp.float32),
         jax.ShapeDtypeStruct((b, n, t, s), jnp.float32)),
    )  # fmt: skip
    return call(q, k, v, mask[:, 0].astype(jnp.uint8), **_heads(n, kv, h), fused=fused)


def _train_fwd_rule(q, k, v, mask):
    o, p = _train_fwd(q, k, v, mask)
    return o, (q, k, v, mask, o, p)


def _train_bwd_rule(res, do):
    q, k, v, mask, o, p = res
    call = jax.ffi.ffi_call(
        TRAIN_TARGETS[1],
        (jax.ShapeDtypeStruct(q.shape, jnp.float32),
         jax.ShapeDtypeStruct(k.shape, jnp.float32),
         jax.ShapeDtypeStruct(v.shape, jnp.float32)),
    )  # fmt: skip
    dq, dk, dv = call(
        q, k, v, mask[:, 0].astype(jnp.uint8), o, p, do.astype(jnp.float32),
        **_heads(q.shape[2], k.shape[2], q.shape[3]),
    )  # fmt: skip
    return dq, dk, dv, None


train_attention.defvjp(_train_fwd_rule, _train_bwd_rule)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def train_attention_qkv(qkv: jax.Array, mask: jax.Array, heads: int, kv_heads: int) -> jax.Array:
    """``train_attention`` of self-attention whose q, k and v are one fused projection.

    Args:
        qkv: [B, T, (N + 2 KV) H] float32: the N query heads, then KV key heads, then KV value
            heads of each token (``x @ [Wq Wk Wv]``, train_norm_dense's output).
        mask: [B, 1, T, T] bool.
        heads, kv_heads: N and KV.

    Returns:
        [B, T, N, H], and as gradient one [B, T, (N + 2 KV) H] array: the kernel reads q, k and
        v in place and writes their gradients in place, so neither the slices of q, k and v
        nor the concatenation of their gradients is a copy (~2.5 ms of a ~43 ms Shakespeare
        step, measured). No RoPE: rotated q and k are new arrays anyway (use train_attention).
    """
    return _qkv_fwd(qkv, mask, heads, kv_heads)[0]


def _qkv_fwd(qkv, mask, heads, kv_heads):
    width = qkv.shape[-1]
    h = width // (heads + 2 * kv_heads) if heads % kv_heads == 0 else 0
    if qkv.ndim != 3 or h == 0 or h * (heads + 2 * kv_heads) != width:
        raise ValueError(
            f"train_attention_qkv: qkv {qkv.shape} is not [B, T, (N + 2 KV) H] for "
            f"N={heads}, KV={kv_heads}"
        )
    b, t = qkv.shape[:2]
    if mask.shape != (b, 1, t, t):
        raise ValueError(f"train_attention_qkv: mask {mask.shape}, want {(b, 1, t, t)}")
    return _attention_call(qkv, qkv, qkv, mask, heads, kv_heads, h, True)


def _qkv_fwd_rule(qkv, mask, heads, kv_heads):
    o, p = _qkv_fwd(qkv, mask, heads, kv_heads)
    return o, (qkv, mask, o, p)


def _qkv_bwd_rule(heads, kv_heads, res, do):
    qkv, mask, o, p = res
    call = jax.ffi.ffi_call(TRAIN_TARGETS[2], jax.ShapeDtypeStruct(qkv.shape, jnp.float32))
    dqkv = call(
        qkv, mask[:, 0].astype(jnp.uint8), o, p, do.astype(jnp.float32),
        **_heads(heads, kv_heads, o.shape[3]),
    )  # fmt: skip
    return dqkv, None


train_attention_qkv.defvjp(_qkv_fwd_rule, _qkv_bwd_rule)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def train_mlp(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array | None,
    w1: jax.Array,
    w2: jax.Array,
    norm: str,
    activation: str,
    eps: float,
) -> jax.Array:
    """A pre-norm block's MLP half with its gradient (float32, no MLP biases):
    ``x + act(norm(x) @ w1) @ w2``.

    Args:
        x: [..., D]; scale, bias: the norm's [D] parameters (bias None for RMSNorm);
            w1: [D, F]; w2: [F, D].
        norm: one of BLOCK_NORMS; activation: one of MLP_ACTIVATIONS; eps: the norm's epsilon.

    Returns:
        [..., D] float32: what lm.layers' Norm, MLP and the residual add compute, to float32
        rounding. The gradient reaches x, scale, bias, w1 and w2, all from the backward
        kernel: dx row by row, then the sums over rows (xn^T dh, g^T dy, the norm's).
    """
    return _mlp_fwd(x, scale, bias, w1, w2, norm, activation, eps)[0]


def _norm_check(name, x, scale, bias, norm, weights):
    d = x.shape[-1]
    if norm not in BLOCK_NORMS:
        raise ValueError(f"{name}: norm {norm!r}; the kernel has {BLOCK_NORMS}")
    if (norm == "layernorm") != (bias is not None):
        raise ValueError(f"{name}: LayerNorm takes a bias, RMSNorm none")
    if scale.shape != (d,) or (bias is not None and bias.shape != (d,)):
        raise ValueError(f"{name}: x {x.shape} and the norm's scale {scale.shape} do not match")
    arrays = (x, scale, *weights) + (() if bias is None else (bias,))
    if any(a.dtype != jnp.float32 for a in arrays):
        raise ValueError(f"{name}: x and the parameters must be float32")


def _mlp_check(x, scale, bias, w1, w2, norm, activation):
    _norm_check("train_mlp", x, scale, bias, norm, (w1, w2))
    if activation not in MLP_ACTIVATIONS:
        raise ValueError(f"train_mlp: activation {activation!r}; the kernel has {MLP_ACTIVATIONS}")
    d = x.shape[-1]
    if w1.ndim != 2 or w1.shape[0] != d or w2.shape != (w1.shape[1], d):
        raise ValueError(
            f"train_mlp: x {x.shape}, w1 {w1.shape} [D, F] and w2 {w2.shape} [F, D] do not match"
        )


def _mlp_fwd(x, scale, bias, w1, w2, norm, activation, eps):
    _mlp_check(x, scale, bias, w1, w2, norm, activation)
    x2 = x.reshape(-1, x.shape[-1])
    m, (d, f) = x2.shape[0], w1.shape
    rows = lambda n: jax.ShapeDtypeStruct((m, n), jnp.float32)  # noqa: E731
    call = jax.ffi.ffi_call(
        MLP_TARGETS[0],
        (rows(d), rows(d), rows(d), rows(f), rows(f), jax.ShapeDtypeStruct((m,), jnp.float32)),
    )
    b = jnp.zeros_like(scale) if bias is None else bias
    y, xhat, xn, h, g, rstd = call(
        x2, scale, b, w1, w2,
        eps=np.float32(eps), rms=norm == "rmsnorm", gelu=activation == "gelu_tanh",
    )  # fmt: skip
    return y.reshape(x.shape), (xhat, xn, h, g, rstd, scale, bias, w1, w2)


def _mlp_bwd(norm, activation, eps, res, dy):
    xhat, xn, h, g, rstd, scale, bias, w1, w2 = res
    dy2 = dy.reshape(xhat.shape).astype(jnp.float32)
    m, d = xhat.shape
    call = jax.ffi.ffi_call(
        MLP_TARGETS[1],
        (jax.ShapeDtypeStruct(xhat.shape, jnp.float32),
         jax.ShapeDtypeStruct(w1.shape, jnp.float32),
         jax.ShapeDtypeStruct(w2.shape, jnp.float32),
         jax.ShapeDtypeStruct((d,), jnp.float32),
         jax.ShapeDtypeStruct((d,), jnp.float32)),
    )  # fmt: skip
    dx, dw1, dw2, dscale, dbias = call(
        dy2, xhat, rstd, xn, h, g, scale, w1, w2,
        rms=norm == "rmsnorm", gelu=activation == "gelu_tanh",
    )  # fmt: skip
    return dx.reshape(dy.shape), dscale, None if bias is None else dbias, dw1, dw2


train_mlp.defvjp(_mlp_fwd, _mlp_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def train_norm_dense(
    x: jax.Array, scale: jax.Array, bias: jax.Array | None, w: jax.Array, norm: str, eps: float
) -> jax.Array:
    """``norm(x) @ w`` with its gradient (float32, no bias on the product): a pre-norm block's
    q/k/v projections in one call, w = [Wq Wk Wv] ([D, N]); returns [..., N].

    As train_mlp's first half; see there for the arguments."""
    return _norm_dense_fwd(x, scale, bias, w, norm, eps)[0]


def _norm_dense_fwd(x, scale, bias, w, norm, eps):
    _norm_check("train_norm_dense", x, scale, bias, norm, (w,))
    if w.ndim != 2 or w.shape[0] != x.shape[-1]:
        raise ValueError(f"train_norm_dense: x {x.shape} and w {w.shape} [D, N] do not match")
    x2 = x.reshape(-1, x.shape[-1])
    m, (d, n) = x2.shape[0], w.shape
    rows = lambda k: jax.ShapeDtypeStruct((m, k), jnp.float32)  # noqa: E731
    call = jax.ffi.ffi_call(
        NORM_DENSE_TARGETS[0], (rows(n), rows(d), rows(d), jax.ShapeDtypeStruct((m,), jnp.float32))
    )
    b = jnp.zeros_like(scale) if bias is None else bias
    y, xhat, xn, rstd = call(x2, scale, b, w, eps=np.float32(eps), rms=norm == "rmsnorm")
    return y.reshape(*x.shape[:-1], n), (xhat, xn, rstd, scale, bias, w)


def _norm_dense_bwd(norm, eps, res, dy):
    xhat, xn, rstd, scale, bias, w = res
    dy2 = dy.reshape(-1, w.shape[1]).astype(jnp.float32)
    d = xhat.shape[1]
    call = jax.ffi.ffi_call(
        NORM_DENSE_TARGETS[1],
        (jax.ShapeDtypeStruct(xhat.shape, jnp.float32),
         jax.ShapeDtypeStruct(w.shape, jnp.float32),
         jax.ShapeDtypeStruct((d,), jnp.float32),
         jax.ShapeDtypeStruct((d,), jnp.float32)),
    )  # fmt: skip
    dx, dw, dscale, dbias = call(dy2, xhat, rstd, xn, scale, w, rms=norm == "rmsnorm")
    return dx.reshape(*dy.shape[:-1], d), dscale, None if bias is None else dbias, dw


train_norm_dense.defvjp(_norm_dense_fwd, _norm_dense_bwd)
