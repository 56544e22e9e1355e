"""Autoregressive decoding: a prefill, then a compiled ``lax.while_loop`` over the KV cache.

    import lm
    from lm import decode
    m = lm.load("smollm2-135m-instruct")
    cfg, params = decode.prepare(m.cfg, m.params, "float32")
    [g] = decode.generate(cfg, params, [m.tokenizer("The capital of France is")["input_ids"]],
                          max_new_tokens=32, eos_ids=decode.eos_ids_of(m))
    print(m.tokenizer.decode(g.token_ids))

Shapes are bucketed so that a session compiles a handful of programs: the batch is padded to
``batch_size`` rows (2 at least in bfloat16, see below), prompts are left-padded to a length
bucket ``P`` and the cache holds ``S = P + N`` slots, N the new-token budget rounded up to 32.
Two programs exist per (batch, P, S) bucket: ``_prefill`` (the prompt in one forward pass, first
token sampled) and ``_loop`` (a ``while_loop`` of one-token steps that stops at ``stop_at`` or
when every row has emitted an end-of-sequence id). Both are compiled ahead of time and cached,
so compile time is measured apart from run time.

Why the loop runs in chunks driven from the host: stop strings need detokenized text, and
streaming needs tokens on the host, neither of which exists inside XLA. The loop state (cache
included) stays on the device and is donated to each call, so a chunk costs one dispatch; with
neither streaming nor stop strings the whole generation is a single call. Streaming uses chunks
of one token: measured on the tiny preset, a host round trip per token costs 0.5-2 ms, a few
percent of a SmolLM2-135M step, and it keeps host callbacks (``jax.debug.callback``, which could
print but not stop the loop) out of the compiled program.

Numerics and speed on CPU (see PERF-NOTES): every matmul accumulates in float32. The output
projection is computed for the last position only (never [B, T, V] in the prefill). On an
x86 CPU with AVX-512 or AVX2 + FMA the products of at most a few rows (the decoding steps of small batches, and the
tied LM head up to 16 rows) run in lm.native's kernel, which streams float32 or bfloat16
weights at memory speed; XLA's bfloat16 matrix x vector product is ~10x slower than float32, so
without the kernel bfloat16 decoding pads a batch of 1 to 2 rows. Parameters spread over
several devices (tensor parallelism) always go through XLA.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lm import native
from lm.config import ModelConfig
from lm.layers import dtype_of
from lm.model import Transformer, init_cache
from lm.sampling import Greedy, Sample, Strategy, choose

log = logging.getLogger(__name__)

Array = jax.Array

DTYPES = ("float32", "bfloat16")


class DecodeError(ValueError):
    """A decoding request that cannot run as given (the message says what to change)."""


@dataclasses.dataclass
class Generation:
    """The result for one prompt.

    Attributes:
        token_ids: generated ids only, including the final end-of-sequence id if one was
            produced (a stop string ends the list at the token that completed it).
        finish_reason: "eos", "stop" (a stop string; see ``stop_strings``) or "length".
        num_prompt_tokens: prompt length after any left truncation.
        truncated: how many prompt tokens were cut from the left.
        timings: seconds for the batch this prompt ran in: ``compile``, ``prefill``, ``decode``.
    """

    token_ids: list[int]
    finish_reason: str
    num_prompt_tokens: int
    truncated: int = 0
    timings: dict[str, float] = dataclasses.field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Parameters and model pieces.


def prepare(cfg: ModelConfig, params, dtype: str | None = None) -> tuple[ModelConfig, dict]:
    """A decoding config and device parameters in ``dtype`` ("float32" or "bfloat16").

    The compute dtype follows the parameter dtype: bfloat16 weights with float32 accumulation
    are the fast path on CPU, while mixing bfloat16 weights with float32 activations would cast
    every weight on every step.

    Raises:
        DecodeError: for a model without an LM head, an encoder, or an unknown dtype.
    """
    if cfg.head != "lm":
        raise DecodeError(f"decoding needs a model with an LM head; this one has head={cfg.head!r}")
    if not cfg.causal:
        raise DecodeError(f"decoding needs a causal decoder; {cfg.family!r} is bidirectional")
    dtype = dtype or cfg.param_dtype
    if dtype not in DTYPES:
        raise DecodeError(f"dtype={dtype!r} is not one of {list(DTYPES)}")
    cfg = cfg.replace(dtype=dtype, param_dtype=dtype, dropout_rate=0.0, attn_dropout_rate=0.0)
    dt = dtype_of(dtype)
    params = jax.device_put(jax.tree.map(lambda x: jnp.asarray(x, dt), params))
    return cfg, params


def _lm_head(cfg: ModelConfig, params: dict, h: Array) -> Array:
    """Logits [B, V] float32 of hidden states h [B, D], as the model's own head computes them."""
    dt = dtype_of(cfg.dtype)
    if "lm_head" in params:  # an untied head, or a tied one's transposed copy (_for_kernel)
        w, contract = params["lm_head"]["kernel"], 0  # [D, V]
    else:
        w, contract = params["embed"]["embedding"], 1  # [V, D]
    if cfg.packed_weights:  # only the kernel reads them, at any number of rows
        return native.small_matmul(h, w, packed=True)
    if cfg.matmul_impl == "native" and native.fits(h.shape[0], w):
        return native.small_matmul(h, w, transpose_w=contract == 1)
    return jax.lax.dot_general(
        h.astype(dt), w.astype(dt), (((1,), (contract,)), ((), ())),
        preferred_element_type=jnp.float32,
    )  # fmt: skip


# The parameters of the latest two trees given to _for_kernel, and what it made of them (a
# benchmark alternates float32 and bfloat16 copies of one model). Each entry holds a second
# copy of the weights (packed) or of the head (transposed) while the tree is in use.
_FOR_KERNEL: list = []


def _for_kernel(cfg: ModelConfig, params: dict) -> tuple[ModelConfig, dict]:
    """The decoding config and parameters for lm.native's kernel; the caller's tree is left as
    it is (shardings, checkpoints).

    - A tied embedding gets a transposed copy as ``lm_head`` [D, V]: the kernel streams it in
      contiguous rows, where reading [V, D] against 16 rows costs a reduction per dot product
      (SmolLM2's [49152, 576] head, 16 rows, two threads: 8.8 against ~12 ms a step).
    - Where ``native.packs()`` (AVX2 hosts), every Dense kernel of the blocks and the head are
      packed (``native.pack``) and ``cfg.packed_weights`` is set, unless the copy would take
      more than half of the free memory (``_packed_copy_fits``).
    """
    if cfg.matmul_impl != "native":
        return cfg, params
    leaves = jax.tree.leaves(params)

    def cached(packs):
        for entry in _FOR_KERNEL:
            if entry[0] == packs and len(entry[1]) == len(leaves):
                if all(a is b for a, b in zip(entry[1], leaves)):
                    return entry[2]
        return None

    packs = native.packs()
    out = cached(packs)
    if out is None and packs and not _packed_copy_fits(params):
        packs = False
        out = cached(packs)
    if out is None:
        out = params
        if cfg.tie_embeddings and "lm_head" not in params:
            e = out["embed"]["embedding"]
            out = dict(out, lm_head={"kernel": jax.jit(jnp.transpose)(e)})
        if packs:  # Dense kernels only: the embedding stays a lookup table
            pack = jax.jit(native.pack)
            out = jax.tree_util.tree_map_with_path(
                lambda path, x: pack(x) if _is_kernel(path) else x, out
            )
        _FOR_KERNEL[:] = [(packs, leaves, out), *_FOR_KERNEL[:1]]
    return cfg.replace(packed_weights=packs), out


def _is_kernel(path) -> bool:
    """Whether a leaf's tree path ends in a Dense ``kernel`` (what packing rearranges)."""
    return getattr(path[-1], "key", None) == "kernel"


def _packed_copy_fits(params) -> bool:
    """Whether a packed copy of the Dense kernels takes at most half of the memory the OS
    reports free (Linux); where it does not (a model near the machine's size), decoding keeps
    the row-major kernel's layout instead of running out of memory."""
    size = sum(x.nbytes for p, x in jax.tree_util.tree_leaves_with_path(params) if _is_kernel(p))
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return True
    if 2 * size <= free:
        return True
    log.warning(
        "lm.decode: not packing the weights for lm.native (a copy of %.1f GB; %.1f GB free): "
        "decoding reads them row-major, more slowly at batch sizes above 4",
        size / 1e9, free / 1e9,
    )  # fmt: skip
    return False


def matmul_impl(params) -> str:
    """The few-row products' implementation: "native" (lm.native's kernel) when it is available
    and the parameters sit on one device, else "xla" (e.g. tensor-parallel decoding)."""
    leaves = jax.tree.leaves(params)
    single = all(len(x.sharding.device_set) == 1 for x in leaves if hasattr(x, "sharding"))
    return "native" if single and native.available() else "xla"


def _trunk(cfg: ModelConfig, params: dict, tokens, mask, positions, cache, last_only=False):
    """Final hidden states [B, T, D] ([B, 1, D] with last_only: see Transformer) and the
    updated cache; no [B, T, V] logits are made."""
    trunk = {k: v for k, v in params.items() if k != "lm_head"}
    out = Transformer(cfg.replace(head="none")).apply(
        {"params": trunk}, tokens, mask=mask, positions=positions, cache=cache,
        last_only=last_only,
    )  # fmt: skip
    return out["hidden"], out["cache"]


def _row_keys(keys: Array, step: Array) -> Array:
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)


def _prompt_pass(cfg, params, tokens, mask, keys, step, strategy, cache_len):
    """The left-padded prompts tokens/mask [B, P] through an empty cache of ``cache_len``
    slots: the token sampled from each row's last position (draw ``step`` of its key), and the
    filled cache."""
    cache = init_cache(cfg, tokens.shape[0], cache_len)
    cache["index"] = 0  # a Python 0: the model knows statically that the cache is empty
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)  # [B, P]
    # Only the last position's hidden state is read (left padding: the last column is real).
    h, cache = _trunk(cfg, params, tokens, mask, positions, cache, last_only=True)
    logits = _lm_head(cfg, params, h[:, -1])
    return choose(logits, strategy, _row_keys(keys, step)), cache


def _first_state(token, keys, eos_ids, out_len, **carry) -> dict:
    """The loop state once the first new token is sampled (see _prefill), plus ``carry``."""
    return dict(
        carry,
        token=token,
        done=jnp.isin(token, eos_ids),
        out=jnp.zeros((token.shape[0], out_len), jnp.int32).at[:, 0].set(token),
        step=jnp.ones((), jnp.int32),
        keys=keys,
    )


def _appended(s: dict, token, eos_ids, **carry) -> dict:
    """Loop state ``s`` with ``token`` [B] as the step's new ids, plus ``carry``."""
    out = jax.lax.dynamic_update_slice(s["out"], token[:, None], (0, s["step"]))
    done = s["done"] | jnp.isin(token, eos_ids)
    return dict(s, **carry, token=token, done=done, out=out, step=s["step"] + 1)


def _run_until(stop_at, body, state):
    """``body`` once per token until ``step == stop_at`` or every row is done."""

    def cond(s):
        return (s["step"] < stop_at) & ~jnp.all(s["done"])

    return jax.lax.while_loop(cond, body, state)


def _prefill(params, tokens, mask, keys, eos_ids, *, cfg, strategy, cache_len, out_len):
    """Run the left-padded prompts tokens/mask [B, P] and sample the first new token.

    Returns the loop state: ``cache``; ``token`` [B] (last sampled, fed next); ``pos`` [B] (its
    position); ``done`` [B] bool; ``out`` [B, N] generated ids; ``step`` (ids generated so far);
    ``keys`` [B] per-row PRNG keys.
    """
    token, cache = _prompt_pass(cfg, params, tokens, mask, keys, jnp.int32(0), strategy, cache_len)
    pos = jnp.sum(mask, axis=1).astype(jnp.int32)
    return _first_state(token, keys, eos_ids, out_len, cache=cache, pos=pos)


def _loop(params, state, eos_ids, stop_at, *, cfg, strategy):
    """Generate one token per iteration until ``step == stop_at`` or every row is done."""
    ones = jnp.ones((state["token"].shape[0], 1), jnp.int32)

    def body(s):
        h, cache = _trunk(cfg, params, s["token"][:, None], ones, s["pos"][:, None], s["cache"])
        logits = _lm_head(cfg, params, h[:, 0])  # [B, V]
        token = choose(logits, strategy, _row_keys(s["keys"], s["step"]))
        return _appended(s, token, eos_ids, cache=cache, pos=s["pos"] + 1)

    return _run_until(stop_at, body, state)


# Past the context: a sliding window (as nanoGPT's sample.py crops its input). Each new token
# comes from a forward pass over the last W tokens of its row (positions 0..W-1, left-padded
# while the row is shorter), so a learned-position model can write past its max_len; no KV
# cache carries over, since every position moves each step. Costs a W-token forward per token.


def _window_step(cfg, params, win, wmask, keys, step, strategy):
    """The next token of each row of the window win/wmask [B, W], and the window moved on."""
    b, w = win.shape
    token, _ = _prompt_pass(cfg, params, win, wmask, keys, step, strategy, w)
    win = jnp.concatenate([win[:, 1:], token[:, None]], axis=1)
    wmask = jnp.concatenate([wmask[:, 1:], jnp.ones((b, 1), wmask.dtype)], axis=1)
    return token, win, wmask


def _slide_prefill(params, tokens, mask, keys, eos_ids, *, cfg, strategy, out_len):
    """_prefill's state for the sliding window: the window [B, W] in place of the cache."""
    token, win, wmask = _window_step(cfg, params, tokens, mask, keys, jnp.int32(0), strategy)
    return _first_state(token, keys, eos_ids, out_len, win=win, wmask=wmask)


def _slide_loop(params, state, eos_ids, stop_at, *, cfg, strategy):
    """_loop on the sliding window."""

    def body(s):
        step = _window_step(cfg, params, s["win"], s["wmask"], s["keys"], s["step"], strategy)
        token, win, wmask = step
        return _appended(s, token, eos_ids, win=win, wmask=wmask)

    return _run_until(stop_at, body, state)


# Compiled programs, keyed by everything that shapes them. Compile once per bucket.
_COMPILED: dict = {}


def _signature(tree) -> tuple:
    leaves, treedef = jax.tree.flatten(tree)
    # Shardings belong to the key: an executable compiled for one device refuses
    # tensor-parallel parameters (and vice versa).
    sig = tuple((x.shape, str(x.dtype), getattr(x, "sharding", None)) for x in leaves)
    return (treedef, sig)


def _compiled(kind: str, fn, args: tuple, static: dict, donate: tuple = ()):
    key = (kind, _signature(args), tuple(sorted(static.items(), key=lambda kv: kv[0])))
    hit = _COMPILED.get(key)
    if hit is not None:
        return hit, 0.0
    t0 = time.perf_counter()
    jitted = jax.jit(functools.partial(fn, **static), donate_argnums=donate)
    exe = jitted.lower(*args).compile()
    _COMPILED[key] = exe
    return exe, time.perf_counter() - t0


# --------------------------------------------------------------------------------------------
# Host side: validation, bucketing, batching, the chunked loop.


def length_bucket(n: int) -> int:
    """Padded prompt length: powers of two up to 256 (at least 16), then multiples of 128."""
    if n <= 256:
        return max(16, 1 << (n - 1).bit_length())
    return -(-n // 128) * 128


def check_request(
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    context: int,
    truncate: bool,
    slide: bool = False,
) -> list[tuple[list[int], int]]:
    """Validated prompts, left-truncated when allowed: a list of (ids, tokens cut).

    With ``slide`` (generation past the context on a sliding window) any max_new_tokens fits,
    and a prompt longer than the context keeps its last ``context`` tokens.

    Raises:
        DecodeError: for max_new_tokens < 1, an empty prompt, or a prompt that leaves no room
            for max_new_tokens within the context (unless ``truncate`` or ``slide``).
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int | np.integer):
        raise DecodeError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
    if max_new_tokens < 1:
        raise DecodeError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if not slide and max_new_tokens >= context:
        raise DecodeError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
            f"context of {context} tokens; use max_new_tokens < {context}, or generate on a "
            "sliding window (slide=True)"
        )
    if not prompts:
        raise DecodeError("no prompts given")
    room = context if slide else context - max_new_tokens
    result = []
    for i, ids in enumerate(prompts):
        ids = [int(t) for t in ids]
        if not ids:
            raise DecodeError(f"prompt {i} is empty (0 tokens); give at least one token")
        cut = 0
        if len(ids) > room:
            if not (truncate or slide):
                raise DecodeError(
                    f"prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} "
                    f"at most {room} fit the context of {context} tokens. Shorten the prompt, "
                    "lower max_new_tokens, or enable left truncation (truncate=True)"
                )
            cut = len(ids) - room
            ids = ids[cut:]
        result.append((ids, cut))
    return result


def _eos_array(eos_ids: Sequence[int]) -> Array:
    """End ids as int32 [E], E a multiple of 8 padded with -1 (never a token): a new eos set
    does not change the compiled programs' shapes."""
    ids = sorted({int(e) for e in eos_ids})
    size = max(8, -(-len(ids) // 8) * 8)
    return jnp.asarray(ids + [-1] * (size - len(ids)), jnp.int32)


def batch_bucket(n: int, batch_size: int) -> int:
    """Rows of a compiled batch for n prompts: the next power of two, at most batch_size."""
    return min(batch_size, 1 << (max(n, 1) - 1).bit_length())


def _left_pad(rows: list[list[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, ids in enumerate(rows):
        tokens[i, length - len(ids) :] = ids
        mask[i, length - len(ids) :] = 1
    return tokens, mask


def _check_vocab(cfg: ModelConfig, prompts: list[tuple[list[int], int]]):
    for i, (ids, _) in enumerate(prompts):
        bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
        if bad:
            raise DecodeError(
                f"prompt {i} holds token ids outside the vocabulary [0, {cfg.vocab_size}): "
                f"{bad[:5]}"
            )


def generate(
    cfg: ModelConfig,
    params: dict,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    strategy: Strategy = Greedy(),
    *,
    seed: int = 0,
    eos_ids: Sequence[int] = (),
    batch_size: int = 0,
    context: int = 0,
    truncate: bool = False,
    should_stop: Callable[[int, list[int]], bool] | None = None,
    on_tokens: Callable[[int, list[int]], None] | None = None,
    chunk: int = 0,
    slide: bool = False,
) -> list[Generation]:
    """Continue each prompt (a list of token ids) by up to ``max_new_tokens`` tokens.

    Args:
        cfg, params: from ``prepare`` (device parameters in the decoding dtype).
        prompts: token id lists, any lengths; they are left-padded into batches.
        max_new_tokens: >= 1.
        strategy: ``Greedy()`` or ``Sample(...)``.
        seed: sampling seed. Row i of the input draws from ``fold_in(key(seed), i)``, so a
            prompt's samples do not depend on the batch it shares.
        eos_ids: ids that end a sequence (kept as its last generated token).
        batch_size: rows per compiled batch (0: all prompts in one batch).
        context: the longest sequence (prompt + new tokens); 0 means ``cfg.max_len``.
        truncate: cut over-long prompts from the left instead of raising.
        should_stop: ``(prompt index, generated ids) -> bool`` checked between chunks (stop
            strings).
        on_tokens: ``(prompt index, new ids)`` called between chunks with the ids generated
            since the last call (streaming).
        chunk: tokens per compiled call (0: 1 when streaming, 16 with ``should_stop``, else
            the whole budget in one call).
        slide: let prompt + max_new_tokens run past the context: a batch that would is
            generated on a sliding window of the last ``context`` tokens, each new token from a
            forward pass over them (as nanoGPT's sample.py; no KV cache, so a token costs a
            ``context``-token forward pass). A prompt longer than the context keeps its last
            ``context`` tokens. Batches that fit decode through the KV cache as without it.

    Returns:
        One Generation per prompt, in input order.

    Raises:
        DecodeError: before anything compiles, for a request that cannot run as given.
    """
    if not isinstance(strategy, Greedy | Sample):
        raise DecodeError(f"strategy must be Greedy() or Sample(...), got {strategy!r}")
    cfg, params = _for_kernel(cfg.replace(matmul_impl=matmul_impl(params)), params)
    context = int(context or cfg.max_len)
    if cfg.positions == "learned" and context > cfg.max_len:
        raise DecodeError(f"context={context} exceeds the model's {cfg.max_len} learned positions")
    checked = check_request(prompts, max_new_tokens, context, truncate, slide)
    _check_vocab(cfg, checked)
    if not chunk:
        chunk = 1 if on_tokens else (16 if should_stop else max_new_tokens)
    eos = _eos_array(eos_ids)
    base_key = jax.random.key(seed)

    # Sort by length so each batch pads little; results are put back in input order.
    order = sorted(range(len(checked)), key=lambda i: len(checked[i][0]))
    batch_size = batch_bucket(len(order), batch_size or len(order))
    results: list[Generation | None] = [None] * len(checked)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        ids = [checked[i][0] for i in rows]
        window = context if slide and max(map(len, ids)) + max_new_tokens > context else 0
        gens = _generate_batch(
            cfg, params, ids, rows, max_new_tokens, strategy,
            base_key, eos, batch_size, should_stop, on_tokens, chunk, window,
        )  # fmt: skip
        for i, g in zip(rows, gens):
            g.truncated = checked[i][1]
            results[i] = g
    return results  # type: ignore[return-value]


def _generate_batch(
    cfg, params, rows, row_ids, max_new, strategy, base_key, eos, batch_size, should_stop,
    on_tokens, chunk, window=0,
) -> list[Generation]:  # fmt: skip
    """One compiled batch: prefill and the chunked loop (window > 0: on a sliding window of
    that many tokens instead of the KV cache)."""
    n = len(rows)
    # Fixed batch shape per session (the last partial batch is padded with copies). Without
    # lm.native, bfloat16 needs >= 2 rows for XLA's faster matmul path (PERF-NOTES: its bf16
    # matrix x vector product is ~10x slower).
    slow_bf16 = cfg.dtype == "bfloat16" and cfg.matmul_impl != "native"
    b = max(batch_size, 2 if slow_bf16 else 1)
    padded = rows + [rows[-1]] * (b - n)
    p = window or length_bucket(max(len(r) for r in padded))
    out_len = -(-max_new // 32) * 32
    tokens, mask = _left_pad(padded, p, pad_id=0)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
        base_key, jnp.asarray(list(row_ids) + [row_ids[-1]] * (b - n), jnp.uint32)
    )
    static = dict(cfg=cfg, strategy=strategy)
    args = (params, jnp.asarray(tokens), jnp.asarray(mask), keys, eos)
    if window:
        prefill, c1 = _compiled(
            "slide_prefill", _slide_prefill, args, dict(static, out_len=out_len)
        )
    else:
        prefill, c1 = _compiled(
            "prefill", _prefill, args, dict(static, cache_len=p + out_len, out_len=out_len)
        )
    t0 = time.perf_counter()
    state = prefill(*args)
    state["token"].block_until_ready()
    t_prefill = time.perf_counter() - t0
    loop_args = (params, state, eos, jnp.int32(0))
    kind, loop_fn = ("slide_loop", _slide_loop) if window else ("loop", _loop)
    loop, c2 = _compiled(kind, loop_fn, loop_args, static, donate=(1,))

    t0 = time.perf_counter()
    step, done_host = 1, np.zeros(b, bool)
    stopped = np.zeros(b, bool)
    out = np.asarray(state["out"])
    done_host = np.asarray(state["done"])

    stop_len = np.zeros(b, np.int64)  # tokens up to the one that completed a stop string

    def emit(lo: int, hi: int):
        for r in range(n):
            if on_tokens and hi > lo:
                on_tokens(row_ids[r], out[r, lo:hi].tolist())
            if should_stop and not stopped[r] and should_stop(row_ids[r], out[r, :hi].tolist()):
                stopped[r] = True
                hits = (
                    j for j in range(lo + 1, hi + 1) if should_stop(row_ids[r], out[r, :j].tolist())
                )
                stop_len[r] = next(hits, hi)

    emit(0, 1)
    while step < max_new and not np.all((done_host | stopped)[:n]):
        if stopped.any():
            state["done"] = jnp.asarray(done_host | stopped | (np.arange(b) >= n))
        state = loop(params, state, eos, jnp.int32(min(max_new, step + chunk)))
        new_step = int(state["step"])
        out, done_host = np.asarray(state["out"]), np.asarray(state["done"])
        emit(step, new_step)
        step = new_step
    t_decode = time.perf_counter() - t0

    eos_set = set(np.asarray(eos).tolist()) - {-1}
    timings = {"compile": c1 + c2, "prefill": t_prefill, "decode": t_decode}
    gens = []
    for r in range(n):
        ids = out[r, :step].tolist()
        reason = "length"
        for j, t in enumerate(ids):
            if t in eos_set:
                ids, reason = ids[: j + 1], "eos"
                break
        if stopped[r] and stop_len[r] <= len(ids):
            ids, reason = ids[: stop_len[r]], "stop"
        gens.append(Generation(ids, reason, len(rows[r]), timings=dict(timings)))
    return gens


# --------------------------------------------------------------------------------------------
# Text level: stop strings, end-of-sequence ids, loading.


def stop_string_checker(tokenizer, stop_strings: Sequence[str]):
    """A ``should_stop`` for ``generate``: true once the decoded text contains a stop string."""
    stops = [s for s in stop_strings if s]

    def should_stop(row: int, ids: list[int]) -> bool:
        text = tokenizer.decode(ids, skip_special_tokens=False)
        return any(s in text for s in stops)

    return should_stop if stops else None


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to (excluding) the earliest stop string, and whether one was found."""
    cuts = [text.find(s) for s in stop_strings if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def eos_ids_of(pretrained, extra: Sequence[int] = ()) -> list[int]:
    """End-of-sequence ids: the tokenizer's, the checkpoint's config/generation_config's, extra."""
    ids = set(int(e) for e in extra)
    tok = getattr(pretrained, "tokenizer", None)
    if tok is not None and tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    path = getattr(pretrained, "path", "")
    if path and os.path.isdir(path):
        for name in ("generation_config.json", "config.json"):
            f = os.path.join(path, name)
            if os.path.exists(f):
                with open(f) as fh:
                    e = json.load(fh).get("eos_token_id")
                ids.update([e] if isinstance(e, int) else list(e or []))
    return sorted(ids)


def is_workdir(path: str) -> bool:
    """A training run directory (``config.json`` written by lm, not an HF model config)."""
    cfg = os.path.join(path, "config.json")
    if not (os.path.isdir(path) and os.path.exists(cfg)):
        return False
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return True
    try:
        with open(cfg) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "model_type" not in data


def load_for_decode(name: str, dtype: str | None = None):
    """A ``Pretrained`` for decoding from a short name, HF dir, hub id, GGUF file or workdir.

    A fine-tuning workdir is restored through ``lm.workdir.load_workdir`` (owned by the
    training code).

    Raises:
        NotImplementedError: for a workdir while lm.checkpoint does not provide load_workdir.
        CheckpointError: when nothing is found under ``name``.
    """
    path = os.path.expanduser(str(name))
    if is_workdir(path):
        try:
            from lm.workdir import load_workdir
        except ImportError as e:
            raise NotImplementedError(
                f"{path} is a training workdir, but lm.workdir.load_workdir is not available "
                "yet; export the run to an HF directory and pass that directory as the model"
            ) from e
        return load_workdir(path, dtype=dtype)
    from lm.pretrained import load

    return load(name, dtype=dtype)
