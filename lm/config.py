"""ModelConfig: the one frozen description of a transformer that every module reads.

No jax code lives here. Presets are plain data (a dict of field overrides), always including a
``tiny`` one for tests. The experiment config (ml_collections) is turned into a ModelConfig in
exactly one place (``lm.experiment.model_config``); modules never see the experiment config.

Field names follow gemma / big_vision: ``vocab_size, d_model, num_heads, num_kv_heads, head_dim,
num_layers, mlp_dim``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

# The three families one implementation covers, switched by fields below:
#   BERT   (Devlin et al. 2019): encoder, learned positions + token types, post-LayerNorm, GELU.
#   GPT-2  (Radford et al. 2019): causal decoder, learned positions, pre-LayerNorm, GELU (tanh).
#   Llama  (Touvron et al. 2023): causal decoder, RoPE, RMSNorm, SwiGLU, grouped-query attention.

HEADS = ("none", "lm", "classification", "token_classification")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture, head and numerics of one transformer.

    Derive variants with ``cfg.replace(...)``; the dataclass is hashable so it can be a static
    argument of ``jax.jit``.
    """

    # Sizes.
    vocab_size: int = 256
    d_model: int = 64
    num_heads: int = 4
    num_kv_heads: int = 4  # < num_heads: grouped-query attention (Ainslie et al. 2023)
    head_dim: int = 16
    num_layers: int = 2
    mlp_dim: int = 256
    max_len: int = 512  # position limit (learned table size, or RoPE context)

    # Architecture switches.
    causal: bool = True  # decoder (causal mask) or encoder (bidirectional)
    norm: str = "rmsnorm"  # "layernorm" | "rmsnorm"
    norm_eps: float = 1e-5
    pre_norm: bool = True  # False: BERT's post-LayerNorm residual blocks
    embed_norm: bool = False  # BERT: LayerNorm right after the embedding sum
    final_norm: bool = True  # pre-norm decoders normalize the last hidden state
    mlp: str = "gated"  # "gated" (SwiGLU, Shazeer 2020) | "plain" (two dense layers)
    activation: str = "silu"  # "silu" | "gelu" (exact erf) | "gelu_tanh" (GPT-2's gelu_new)
    positions: str = "rope"  # "rope" (Su et al. 2021) | "learned"
    rope_theta: float = 10000.0
    # RoPE scaling as a tuple of (key, value) pairs so the config stays hashable:
    # (("type", "linear"), ("factor", 2.0)) or the llama3 set
    # (("type", "llama3"), ("factor", 8.0), ("low_freq_factor", 1.0), ("high_freq_factor", 4.0),
    #  ("original_max_len", 8192)).
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    type_vocab_size: int = 0  # BERT token types; 0 means none
    qkv_bias: bool = False  # bias on q/k/v projections (BERT, GPT-2, Qwen2)
    out_bias: bool = False  # bias on attention output projection (BERT, GPT-2)
    mlp_bias: bool = False  # bias on MLP projections (BERT, GPT-2)
    tie_embeddings: bool = True  # LM head reuses the token embedding matrix

    # Head on top of the trunk.
    head: str = "lm"  # one of HEADS
    num_labels: int = 2
    pooler: bool = False  # BERT pooler (dense + tanh on the first token) before the classifier
    classifier_bias: bool = True  # BERT's classifier has a bias, HF decoders' `score` has none
    pad_token_id: int = 0  # decoders pool the last non-pad token for classification

    # Regularization.
    dropout_rate: float = 0.0
    attn_dropout_rate: float = 0.0

    # Numerics and performance.
    dtype: str = "float32"  # compute dtype of activations
    param_dtype: str = "float32"  # storage dtype of parameters
    # Training/eval attention: "xla" runs lm.layers.dot_attention (plain XLA ops; also what
    # decoding through a KV cache runs), "native" lm.native's fused CPU kernel with its
    # gradient for short float32 sequences (one device; else as "xla"), "cudnn" flash
    # attention, "auto" lets jax.nn.dot_product_attention choose.
    attention_impl: str = "xla"
    # Training/eval pre-norm blocks: "xla", or "native": lm.native's fused CPU calls with their
    # gradients for norm + q/k/v projections and norm + MLP + residual (one each a layer),
    # where they apply (float32; plain gelu_tanh/relu MLP; no q/k/v or MLP biases; no LoRA
    # on those; no dropout in training; no KV cache; one device); elsewhere as "xla".
    block_impl: str = "xla"
    # Few-row products (decoding): "xla" or "native" (lm.native's CPU kernel; no gradient).
    # lm.decode picks "native" by itself where it is available; training leaves "xla".
    matmul_impl: str = "xla"
    # Decoding with matmul_impl "native": the blocks' Dense kernels and the LM head are in
    # lm.native.pack's panel layout (lm.decode packs them on AVX2 hosts; see native.packs).
    packed_weights: bool = False
    remat: str = "none"  # "none" | "full" | "dots": activation rematerialization per block
    scan_layers: bool = False  # nn.scan over layers: params stacked on a leading 'layers' axis

    # LoRA (Hu et al. 2021): rank 0 disables it. Targets name Dense modules inside a block
    # ("q", "k", "v", "o", "gate", "up", "down").
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("q", "v")

    # Provenance, used by export (HF model_type) and tokenizer lookup.
    family: str = "llama"  # "bert" | "gpt2" | "llama" | "mistral" | "qwen2"

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def __post_init__(self):
        errors = []
        if self.head not in HEADS:
            errors.append(f"head={self.head!r} is not one of {HEADS}")
        if self.norm not in ("layernorm", "rmsnorm"):
            errors.append(f"norm={self.norm!r} is not 'layernorm' or 'rmsnorm'")
        if self.mlp not in ("gated", "plain"):
            errors.append(f"mlp={self.mlp!r} is not 'gated' or 'plain'")
        if self.activation not in ("silu", "gelu", "gelu_tanh", "relu"):
            errors.append(f"activation={self.activation!r} is not silu, gelu, gelu_tanh or relu")
        if self.positions not in ("rope", "learned"):
            errors.append(f"positions={self.positions!r} is not 'rope' or 'learned'")
        if self.num_heads % self.num_kv_heads:
            errors.append(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.dtype not in ("float32", "bfloat16", "float16"):
            errors.append(f"dtype={self.dtype!r} is not float32, bfloat16 or float16")
        if self.param_dtype not in ("float32", "bfloat16", "float16"):
            errors.append(f"param_dtype={self.param_dtype!r} is not float32, bfloat16 or float16")
        if self.matmul_impl not in ("xla", "native"):
            errors.append(f"matmul_impl={self.matmul_impl!r} is not 'xla' or 'native'")
        if self.packed_weights and self.matmul_impl != "native":
            errors.append(
                "packed_weights=True needs matmul_impl='native' (only its kernel reads them)"
            )
        if self.remat not in ("none", "full", "dots"):
            errors.append(f"remat={self.remat!r} is not none, full or dots")
        if errors:
            raise ValueError("Invalid ModelConfig: " + "; ".join(errors))

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    def num_params(self) -> int:
        """Parameter count computed from the sizes (the tests check it against eval_shape)."""
        from lm.model import count_params  # local import: config stays jax-free at import time

        return count_params(self)


# Presets are data: field overrides on top of a family's base. Counts in the comments are the
# published ones; tests check them through jax.eval_shape.
_BERT = dict(
    family="bert",
    causal=False,
    norm="layernorm",
    norm_eps=1e-12,
    pre_norm=False,
    embed_norm=True,
    final_norm=False,
    mlp="plain",
    activation="gelu",
    positions="learned",
    type_vocab_size=2,
    qkv_bias=True,
    out_bias=True,
    mlp_bias=True,
    head="none",
    pooler=True,
    vocab_size=30522,
    max_len=512,
)
_GPT2 = dict(
    family="gpt2",
    causal=True,
    norm="layernorm",
    norm_eps=1e-5,
    mlp="plain",
    activation="gelu_tanh",
    positions="learned",
    qkv_bias=True,
    out_bias=True,
    mlp_bias=True,
    tie_embeddings=True,
    vocab_size=50257,
    max_len=1024,
)
_LLAMA = dict(family="llama", causal=True, norm="rmsnorm", mlp="gated", activation="silu")

PRESETS: dict[str, dict[str, Any]] = {
    # Tests: a few thousand parameters, every code path of a Llama-style decoder.
    "tiny": dict(
        _LLAMA,
        vocab_size=128,
        d_model=32,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        num_layers=2,
        mlp_dim=64,
        max_len=128,
    ),
    "tiny-bert": dict(
        _BERT,
        vocab_size=128,
        d_model=32,
        num_heads=4,
        num_kv_heads=4,
        head_dim=8,
        num_layers=2,
        mlp_dim=64,
        max_len=128,
    ),
    "tiny-gpt2": dict(
        _GPT2,
        vocab_size=128,
        d_model=32,
        num_heads=4,
        num_kv_heads=4,
        head_dim=8,
        num_layers=2,
        mlp_dim=128,
        max_len=128,
    ),
    # BERT-base 109.5M (bert-base-uncased incl. pooler), BERT-large 335.1M.
    "bert-base": dict(
        _BERT,
        d_model=768,
        num_heads=12,
        num_kv_heads=12,
        head_dim=64,
        num_layers=12,
        mlp_dim=3072,
    ),
    "bert-large": dict(
        _BERT,
        d_model=1024,
        num_heads=16,
        num_kv_heads=16,
        head_dim=64,
        num_layers=24,
        mlp_dim=4096,
    ),
    # all-MiniLM-L6-v2: 22.7M.
    "minilm-l6": dict(
        _BERT,
        d_model=384,
        num_heads=12,
        num_kv_heads=12,
        head_dim=32,
        num_layers=6,
        mlp_dim=1536,
    ),
    # GPT-2 124M / 355M / 774M / 1.56B (tied head).
    "gpt2": dict(
        _GPT2,
        d_model=768,
        num_heads=12,
        num_kv_heads=12,
        head_dim=64,
        num_layers=12,
        mlp_dim=3072,
    ),
    "gpt2-medium": dict(
        _GPT2,
        d_model=1024,
        num_heads=16,
        num_kv_heads=16,
        head_dim=64,
        num_layers=24,
        mlp_dim=4096,
    ),
    "gpt2-large": dict(
        _GPT2,
        d_model=1280,
        num_heads=20,
        num_kv_heads=20,
        head_dim=64,
        num_layers=36,
        mlp_dim=5120,
    ),
    "gpt2-xl": dict(
        _GPT2,
        d_model=1600,
        num_heads=25,
        num_kv_heads=25,
        head_dim=64,
        num_layers=48,
        mlp_dim=6400,
    ),
    # SmolLM2-135M: 134.5M (tied head).
    "smollm2-135m": dict(
        _LLAMA,
        vocab_size=49152,
        d_model=576,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        num_layers=30,
        mlp_dim=1536,
        max_len=8192,
        rope_theta=100000.0,
        norm_eps=1e-5,
        tie_embeddings=True,
        pad_token_id=2,
    ),
    # Llama-3-8B: 8.03B (untied head), rope_theta 500k.
    "llama3-8b": dict(
        _LLAMA,
        vocab_size=128256,
        d_model=4096,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        num_layers=32,
        mlp_dim=14336,
        max_len=8192,
        rope_theta=500000.0,
        norm_eps=1e-5,
        tie_embeddings=False,
    ),
    # A ~1B Llama-style model (Llama-3.2-1B sizes) for throughput benchmarks.
    "llama-1b": dict(
        _LLAMA,
        vocab_size=128256,
        d_model=2048,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        num_layers=16,
        mlp_dim=8192,
        max_len=8192,
        rope_theta=500000.0,
        norm_eps=1e-5,
        tie_embeddings=True,
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """Build a ModelConfig from a named preset, with field overrides.

    Raises:
        KeyError: naming the unknown preset and the known ones.
    """
    if name not in PRESETS:
        raise KeyError(f"Unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
