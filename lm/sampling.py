"""Sampling strategies as small frozen dataclasses, and the logit filters they use.

A strategy is hashable, so it is a static argument of the compiled decode loop: changing
temperature or top-k recompiles, while the seed (a traced key) does not. The filters follow
transformers' logits warpers in order and semantics (temperature, then top-k, then top-p;
Holtzman et al. 2019 for nucleus sampling), so the same settings mean the same distribution.

    strategy = make_strategy("sample", temperature=0.8, top_k=50, top_p=0.95)
    next_ids = choose(logits, strategy, keys)   # logits [B, V] float32, keys [B] -> [B] int32
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array

METHODS = ("greedy", "sample")


@dataclasses.dataclass(frozen=True)
class Greedy:
    """Always the most likely token (ties: the lowest id, as ``argmax``)."""


@dataclasses.dataclass(frozen=True)
class Sample:
    """Ancestral sampling from softmax(logits / temperature), optionally truncated.

    Attributes:
        temperature: > 0; below 1 sharpens the distribution, above 1 flattens it.
        top_k: keep the k most likely tokens (0: no limit). Ties with the k-th are kept.
        top_p: keep the smallest set of most likely tokens whose probability reaches top_p
            (nucleus sampling); 1.0 keeps everything. Must lie in (0, 1].
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        errors = []
        if not self.temperature > 0:
            errors.append(
                f"temperature={self.temperature} must be > 0 (for deterministic decoding use "
                "sampling='greedy')"
            )
        if isinstance(self.top_k, bool) or int(self.top_k) != self.top_k or self.top_k < 0:
            errors.append(f"top_k={self.top_k} must be an integer >= 0 (0 disables it)")
        if not 0.0 < self.top_p <= 1.0:
            errors.append(f"top_p={self.top_p} must lie in (0, 1] (1.0 disables it)")
        if errors:
            raise ValueError("Invalid sampling settings: " + "; ".join(errors))


Strategy = Greedy | Sample


def make_strategy(
    method: str, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> Strategy:
    """The strategy named by ``method`` ("greedy" or "sample").

    Raises:
        ValueError: for an unknown method or out-of-range settings, naming the valid choices.
    """
    if method == "greedy":
        return Greedy()
    if method == "sample":
        return Sample(float(temperature), int(top_k), float(top_p))
    raise ValueError(f"Unknown sampling method {method!r}; expected one of {list(METHODS)}")


def top_k_filter(logits: Array, k: int) -> Array:
    """Logits [..., V] with everything below the k-th largest set to -inf (k=0: unchanged).

    As transformers' TopKLogitsWarper: a token is removed when its logit is strictly smaller
    than the k-th largest, so ties with the k-th survive.
    """
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]  # [..., 1]
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: Array, p: float) -> Array:
    """Logits [..., V] truncated to the nucleus of probability ``p`` (p=1: unchanged).

    Token i (in descending order) is kept when the probability of all tokens before it is
    < p, so the most likely token always survives; this is transformers' TopPLogitsWarper
    (which removes tokens whose ascending cumulative probability is <= 1 - p).
    """
    if p >= 1.0:
        return logits
    desc = -jnp.sort(-logits, axis=-1)  # [..., V]
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability mass strictly before each token
    keep = before < p
    # The smallest kept logit is the threshold; keep[..., 0] is always true.
    threshold = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def filter_logits(logits: Array, strategy: Sample) -> Array:
    """Temperature, then top-k, then top-p: the distribution ``Sample`` draws from (float32)."""
    x = logits.astype(jnp.float32) / strategy.temperature
    x = top_k_filter(x, strategy.top_k)
    if strategy.top_p < 1.0 and 0 < strategy.top_k < x.shape[-1]:
        # Only the top-k survivors can be in the nucleus: sort k values instead of V.
        vals = top_p_filter(jax.lax.top_k(x, strategy.top_k)[0], strategy.top_p)  # [..., k]
        cut = jnp.min(jnp.where(jnp.isfinite(vals), vals, jnp.inf), axis=-1, keepdims=True)
        return jnp.where(x < cut, -jnp.inf, x)
    return top_p_filter(x, strategy.top_p)


def greedy_ids(logits: Array) -> Array:
    """``jnp.argmax(logits, -1)`` as int32 [B] (ties and NaN alike: the lowest such id), as a
    max and a min over the vocabulary: XLA:CPU runs argmax's (value, index) reduction about
    1.8x slower (1.8 ms against 1.0 for [16, 49152] float32; a batch-16 decoding step is ~50)."""
    top = jnp.max(logits, axis=-1, keepdims=True)  # NaN if the row holds one
    ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    hit = (logits == top) | jnp.isnan(logits)
    return jnp.min(jnp.where(hit, ids, logits.shape[-1]), axis=-1)


def choose(logits: Array, strategy: Strategy, keys: Array | None = None) -> Array:
    """Next token ids [B] int32 from logits [B, V].

    Args:
        logits: float logits of the next token.
        strategy: Greedy or Sample.
        keys: one PRNG key per row [B] (typed keys), used by Sample only. One key per row lets
            a prompt draw the same tokens whatever else shares its batch.
    """
    if isinstance(strategy, Greedy):
        return greedy_ids(logits)
    if keys is None:
        raise ValueError("Sample needs one PRNG key per row")
    x = filter_logits(logits, strategy)
    return jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32)
