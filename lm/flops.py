"""Model FLOPs per token and device peak FLOP/s, for model-FLOPs utilization (MFU).

MFU (Chowdhery et al. 2022, PaLM appendix B) = the FLOPs the model needs per token times the
tokens per second, over the peak FLOP/s of the hardware. The model FLOPs do not count
rematerialization or padding, so MFU compares implementations fairly (HFU would reward remat).

Per token of a sequence of T tokens, a training step (forward + backward) costs

    6 * N  +  12 * L * H * Q * T

where N counts the parameters that take part in matrix multiplies (every weight matrix; the
input embedding tables are lookups and are left out, the tied LM head is counted once as the
output projection), L layers, H query heads of size Q: each layer's QK^T and AV products are
2 * 2 * H * Q * T FLOPs per token forward, x3 with the backward pass. Like PaLM (and MaxText's
default) the causal mask is not credited; ``causal_discount=True`` halves the attention term.
A forward pass alone (inference) is a third of this.
"""

from __future__ import annotations

import time

from lm.config import ModelConfig

# Dense (no sparsity) peak TFLOP/s per chip in bfloat16, from the vendors' data sheets. Keys are
# matched as substrings of ``jax.Device.device_kind`` (lower case), most specific first.
PEAK_TFLOPS_BF16: dict[str, float] = {
    "h200": 989.0,  # SXM; same tensor cores as H100
    "h100": 989.0,  # SXM; PCIe parts are 756
    "gh200": 989.0,
    "a100": 312.0,
    "l40s": 362.0,
    "a10g": 70.0,
    "tpu v6 lite": 918.0,  # v6e (Trillium)
    "tpu v5p": 459.0,
    "tpu v5 lite": 197.0,  # v5e
    "tpu v5e": 197.0,
    "tpu v5": 459.0,
    "tpu v4": 275.0,
    "tpu v3": 123.0,
}

# float32 matmuls: GPUs run them as TF32 on tensor cores under XLA's default precision.
PEAK_TFLOPS_FP32: dict[str, float] = {
    "h200": 494.5,
    "h100": 494.5,
    "gh200": 494.5,
    "a100": 156.0,
}


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters used in matrix multiplies: all, minus embedding lookups, plus a tied head."""
    from lm.model import param_shapes

    shapes = param_shapes(cfg)
    total = sum(int(x.size) for x in _leaves(shapes))
    lookups = 0
    for name in ("embed", "pos_embed", "type_embed"):
        if name in shapes:
            lookups += sum(int(x.size) for x in _leaves(shapes[name]))
    tied_head = cfg.vocab_size * cfg.d_model if cfg.head == "lm" and cfg.tie_embeddings else 0
    return total - lookups + tied_head


def flops_per_token(
    cfg: ModelConfig, seq_len: int, training: bool = True, causal_discount: bool = False
) -> float:
    """Model FLOPs per token (PaLM appendix B): ``6N + 12LHQT`` for training, a third of it for
    a forward pass."""
    attn = 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
    if causal_discount and cfg.causal:
        attn /= 2
    train = 6.0 * matmul_params(cfg) + attn
    return train if training else train / 3


def peak_tflops(device_kind: str, dtype: str = "bfloat16") -> float | None:
    """Peak dense TFLOP/s of one chip named ``device_kind`` for ``dtype``, or None if unknown."""
    kind = device_kind.lower()
    table = PEAK_TFLOPS_FP32 if dtype == "float32" else PEAK_TFLOPS_BF16
    for key, value in table.items():
        if key in kind:
            return value
    if dtype == "float32" and "tpu" in kind:
        return peak_tflops(device_kind, "bfloat16")  # TPUs run fp32 matmuls as bf16 passes
    return None


def measured_peak_tflops(dtype: str = "float32", n: int = 2048, repeats: int = 5) -> float:
    """Throughput of a large jitted matmul on the default device, in TFLOP/s.

    The stand-in for a data-sheet peak where none is known (CPUs): bfloat16 operands accumulate
    in float32 as the model's matmuls do (the AMX path on recent Xeons, PERF-NOTES.md).
    """
    import jax
    import jax.numpy as jnp

    dt = jnp.dtype(dtype)
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dt)
    f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    f(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best / 1e12


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)
