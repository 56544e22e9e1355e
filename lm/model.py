"""Block and Transformer: one implementation for BERT encoders, GPT-2 and Llama-family decoders.

The model is plain Flax Linen used functionally: ``params = init_params(cfg, rng)`` gives an
explicit pytree, ``Transformer(cfg).apply({"params": params}, tokens, ...)`` runs it. Which
architecture runs is decided by the frozen ModelConfig only.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm.config import ModelConfig
from lm.dropout import Dropout
from lm.layers import (
    MLP,
    Attention,
    Dense,
    Embed,
    Norm,
    attention_mask,
    constrain,
    dtype_of,
    last_rows,
    native_mlp_block,
    native_qkv,
    rope_angles,
    rope_inv_freq,
)

Array = jax.Array


class Block(nn.Module):
    """One transformer layer.

    pre-norm (GPT-2, Llama):  x + attn(norm(x)), then  h + mlp(norm(h))
    post-norm (BERT):         norm(x + attn(x)), then  norm(h + mlp(h))
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, rope, mask, cache=None, index=None, deterministic=True, last_only=False):
        cfg = self.cfg
        norm = functools.partial(Norm, cfg.norm, cfg.norm_eps, cfg.dtype, cfg.param_dtype)
        drop = Dropout(cfg.dropout_rate)
        attn = Attention(cfg, name="attn")
        mlp = MLP(cfg, name="mlp")
        if cfg.pre_norm:
            qkv = None if cache is not None else native_qkv(self, cfg, x, deterministic)
            if qkv is None:
                x_in = norm(name="attn_norm")(x)
            else:
                x_in = x  # only its shape is read
            if cfg.matmul_impl == "native" and (deterministic or not cfg.dropout_rate):
                # Decoding: the skip connections ride in the o and down products (lm.native
                # lands them on the residual in place: no separate add over [B, T, D]).
                h, cache = attn(
                    x_in, rope, mask, cache, index, deterministic, projected=qkv,
                    last_only=last_only, residual=last_rows(x, last_only),
                )  # fmt: skip
                out = mlp(norm(name="mlp_norm")(h), deterministic, residual=h)
                return constrain(out, ("batch", "length", "embed")), cache
            a, cache = attn(
                x_in, rope, mask, cache, index, deterministic, projected=qkv, last_only=last_only
            )
            h = last_rows(x, last_only) + drop(a, deterministic=deterministic)
            out = native_mlp_block(self, cfg, h, deterministic)
            if out is None:
                out = h + drop(
                    mlp(norm(name="mlp_norm")(h), deterministic), deterministic=deterministic
                )
        else:
            a, cache = attn(x, rope, mask, cache, index, deterministic, last_only=last_only)
            h = norm(name="attn_norm")(
                last_rows(x, last_only) + drop(a, deterministic=deterministic)
            )
            m = mlp(h, deterministic)
            out = norm(name="mlp_norm")(h + drop(m, deterministic=deterministic))
        return constrain(out, ("batch", "length", "embed")), cache


class _ScanBlock(nn.Module):
    """Block with scan's calling convention: carry x in, (x, per-layer cache) out."""

    cfg: ModelConfig
    deterministic: bool

    @nn.compact
    def __call__(self, x, rope, mask, cache, index):
        return Block(self.cfg, name="block")(x, rope, mask, cache, index, self.deterministic)


def _remat_policy(name: str):
    if name == "dots":
        return jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
    return None


class Transformer(nn.Module):
    """Embeddings, ``num_layers`` blocks, and the head named by ``cfg.head``.

    Call with:
        tokens: int [B, T].
        mask: int/bool [B, T], 1 for real tokens (default: all real).
        positions: int [B, T], position of each token in its own sequence (default 0..T-1).
        token_types: int [B, T] (BERT sentence A/B; default zeros).
        segment_ids: int [B, T] packed-example ids; attention stays inside a segment.
        cache: from ``init_cache``; the T tokens are written at slot ``cache["index"]``. An
            ``index`` that is the Python int 0 (as lm.decode's prefill sets it) says statically
            that the cache is empty: attention then reads the T new keys only (a prefill).
        deterministic: False enables dropout (needs a "dropout" rng).
        last_only: only position T - 1 is wanted (lm.decode's prefill): the last block's
            attention output projection and MLP, the final norm and the head run on that
            position alone, while the keys and values of all T tokens still fill the cache
            (llama.cpp skips the same rows; 78% of a layer, ~2.5% of a 30-layer prefill).
            ``hidden`` and ``logits`` are then [B, 1, ...]. A "lm" or "none" head only.

    Returns a dict: ``hidden`` [B, T, D]; ``logits`` ([B, T, V] for "lm", [B, C] for
    "classification", [B, T, C] for "token_classification"), float32; ``pooled`` [B, D] for
    BERT-style pooler; ``cache`` (updated) when a cache was given.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        tokens: Array,
        mask: Array | None = None,
        positions: Array | None = None,
        token_types: Array | None = None,
        segment_ids: Array | None = None,
        cache: dict | None = None,
        deterministic: bool = True,
        last_only: bool = False,
    ) -> dict[str, Array]:
        cfg = self.cfg
        if last_only and cfg.head not in ("lm", "none"):
            raise ValueError(f"last_only applies to a 'lm' or 'none' head, not {cfg.head!r}")
        b, t = tokens.shape
        if mask is None:
            mask = jnp.ones((b, t), jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        drop = Dropout(cfg.dropout_rate)

        embed = Embed(cfg.vocab_size, cfg.d_model, cfg.dtype, cfg.param_dtype, name="embed")
        x = embed(tokens)  # [B, T, D]
        if cfg.positions == "learned":
            pos_embed = Embed(
                cfg.max_len,
                cfg.d_model,
                cfg.dtype,
                cfg.param_dtype,
                name="pos_embed",
                axes=("table", "embed"),
            )
            x = x + pos_embed(positions)
        if cfg.type_vocab_size:
            if token_types is None:
                token_types = jnp.zeros((b, t), jnp.int32)
            type_embed = Embed(
                cfg.type_vocab_size,
                cfg.d_model,
                cfg.dtype,
                cfg.param_dtype,
                name="type_embed",
                axes=("table", "embed"),
            )
            x = x + type_embed(token_types)
        if cfg.embed_norm:
            x = Norm(cfg.norm, cfg.norm_eps, cfg.dtype, cfg.param_dtype, name="embed_norm")(x)
        x = drop(x, deterministic=deterministic)
        x = constrain(x, ("batch", "length", "embed"))

        if cache is not None:
            # Decoding: keys live in the cache; the new tokens occupy [index, index + T).
            index = cache["index"]
            kv_valid = jax.lax.dynamic_update_slice(
                cache["mask"], mask.astype(cache["mask"].dtype), (0, index)
            )
            attn_mask = attention_mask(kv_valid, cfg.causal, index + jnp.arange(t))
        else:
            index, kv_valid = None, None
            seg = segment_ids
            attn_mask = attention_mask(mask, cfg.causal, jnp.arange(t), seg, seg)

        # RoPE's cosines and sines, once for all layers (None: learned or no positions).
        rope = rope_angles(positions, rope_inv_freq(cfg)) if cfg.positions == "rope" else None
        if cfg.scan_layers:  # one block body for all layers: every position, then the last
            x, new_layers = self._scanned_layers(x, rope, attn_mask, cache, index, deterministic)
            x = last_rows(x, last_only)
        else:
            block_cls = Block
            if cfg.remat != "none":
                block_cls = nn.remat(Block, policy=_remat_policy(cfg.remat), static_argnums=(6, 7))
            new_layers = []
            for i in range(cfg.num_layers):
                layer_cache = None if cache is None else cache["layers"][i]
                last = last_only and i == cfg.num_layers - 1
                x, layer_cache = block_cls(cfg, name=f"layers_{i}")(
                    x, rope, attn_mask, layer_cache, index, deterministic, last
                )
                new_layers.append(layer_cache)
        if cfg.final_norm:
            x = Norm(cfg.norm, cfg.norm_eps, cfg.dtype, cfg.param_dtype, name="final_norm")(x)

        out: dict[str, Array] = {"hidden": x}
        if cache is not None:
            out["cache"] = {
                "layers": new_layers,
                "index": jnp.asarray(index + t, jnp.int32),
                "mask": kv_valid,
            }
        out.update(self._head(x, mask, embed, deterministic))
        return out

    def _scanned_layers(self, x, rope, attn_mask, cache, index, deterministic):
        """All blocks as one ``nn.scan``: parameters stacked on a leading ``layers`` axis, one
        compiled block body (fast compiles for deep models; MaxText/levanter do the same)."""
        cfg = self.cfg
        body = _ScanBlock
        if cfg.remat != "none":
            body = nn.remat(_ScanBlock, policy=_remat_policy(cfg.remat), prevent_cse=False)
        scanned = nn.scan(
            body,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast),
            length=cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        layer_caches = None if cache is None else cache["layers"]
        x, new_caches = scanned(cfg, deterministic, name="layers")(
            x, rope, attn_mask, layer_caches, index
        )
        return x, new_caches

    def _head(self, x, mask, embed, deterministic):
        cfg = self.cfg
        drop = Dropout(cfg.dropout_rate)
        cls = functools.partial(Dense, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        out = {}
        pooled = None
        if cfg.pooler:
            # BERT pooler: tanh(W h_[CLS] + b), the sentence representation for classification.
            pooled = jnp.tanh(cls(cfg.d_model, ("embed", "embed2"), True, name="pooler")(x[:, 0]))
            out["pooled"] = pooled
        if cfg.head == "lm":
            if cfg.tie_embeddings:
                out["logits"] = embed.attend(x)
            else:
                head = cls(cfg.vocab_size, ("embed", "vocab"), False, name="lm_head")
                out["logits"] = head(x).astype(jnp.float32)
        elif cfg.head == "classification":
            if pooled is not None:
                feats = pooled
            else:
                # Decoders summarize a sequence by its last real token (as HF *ForSequence-
                # Classification): the rightmost position whose mask is 1.
                t = x.shape[1]
                last = jnp.max(jnp.where(mask.astype(bool), jnp.arange(t), 0), axis=1)
                feats = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
            feats = drop(feats, deterministic=deterministic)
            head = cls(cfg.num_labels, ("embed", None), cfg.classifier_bias, name="classifier")
            out["logits"] = head(feats).astype(jnp.float32)
        elif cfg.head == "token_classification":
            feats = drop(x, deterministic=deterministic)
            head = cls(cfg.num_labels, ("embed", None), cfg.classifier_bias, name="classifier")
            out["logits"] = head(feats).astype(jnp.float32)
        return out


def _dummy_inputs(cfg: ModelConfig):
    return jnp.zeros((1, 8), jnp.int32)


def init_boxed(cfg: ModelConfig, rng: Array):
    """Parameters as flax LogicallyPartitioned boxes (carry logical axis names)."""
    return Transformer(cfg).init(rng, _dummy_inputs(cfg))["params"]


def init_params(cfg: ModelConfig, rng: Array | int = 0) -> dict:
    """Random parameters, a plain pytree of arrays (dtype ``cfg.param_dtype``)."""
    if isinstance(rng, int):
        rng = jax.random.PRNGKey(rng)
    return nn.unbox(jax.jit(init_boxed, static_argnums=0)(cfg, rng))


@functools.lru_cache(maxsize=32)
def _abstract_boxed(cfg: ModelConfig):
    """``jax.eval_shape`` of the init, once per config: loading, sharding and the train state
    each asked for it, 3-4 traces a launch (MiniLM: ~1 s for a launch's first, 0.22-0.26 s
    after). Callers get new containers (``nn.unbox``, ``nn.get_partition_spec``); the leaves
    are immutable."""
    return jax.eval_shape(functools.partial(init_boxed, cfg), jax.random.PRNGKey(0))


def param_shapes(cfg: ModelConfig) -> dict:
    """ShapeDtypeStructs of the parameters, computed without allocating memory."""
    return nn.unbox(_abstract_boxed(cfg))


def logical_axes(cfg: ModelConfig) -> dict:
    """PartitionSpecs of logical axis names, one per parameter (same tree as the params)."""
    return nn.get_partition_spec(_abstract_boxed(cfg))


def count_params(cfg: ModelConfig) -> int:
    return sum(x.size for x in jax.tree.leaves(param_shapes(cfg)))


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype: str | None = None) -> dict:
    """An empty KV cache for ``batch`` sequences of up to ``length`` tokens.

    Returns ``{"layers": [{"k": [B, K, H, S], "v": [B, K, S, H]}] * L, "index": int32 scalar
    (next free slot), "mask": int32 [B, S] (1 where a slot holds a real token)}``.
    """
    dt = dtype_of(dtype or cfg.dtype)
    # Layouts chosen for the attention products (lm.layers.Attention).
    k_shape = (batch, cfg.num_kv_heads, cfg.head_dim, length)
    v_shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)
    if cfg.scan_layers:  # one stacked cache, scanned along with the stacked parameters
        n = cfg.num_layers
        layers = {"k": jnp.zeros((n, *k_shape), dt), "v": jnp.zeros((n, *v_shape), dt)}
    else:
        layers = [
            {"k": jnp.zeros(k_shape, dt), "v": jnp.zeros(v_shape, dt)}
            for _ in range(cfg.num_layers)
        ]
    return {
        "layers": layers,
        "index": jnp.zeros((), jnp.int32),
        "mask": jnp.zeros((batch, length), jnp.int32),
    }


def forward(cfg: ModelConfig, params: dict, tokens: Array, **kwargs) -> dict[str, Array]:
    """Convenience: ``Transformer(cfg).apply({"params": params}, tokens, **kwargs)``."""
    return Transformer(cfg).apply({"params": params}, tokens, **kwargs)


def stack_layers(cfg: ModelConfig, params: dict) -> dict:
    """Unrolled ``layers_0..layers_{L-1}`` -> the stacked ``layers/block`` tree of scan_layers."""
    if "layers" in params:
        return params
    names = [f"layers_{i}" for i in range(cfg.num_layers)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[n] for n in names])
    out = {k: v for k, v in params.items() if k not in names}
    out["layers"] = {"block": stacked}
    return out


def unstack_layers(cfg: ModelConfig, params: dict) -> dict:
    """Inverse of ``stack_layers`` (what conversion and export read)."""
    if "layers" not in params:
        return params
    out = {k: v for k, v in params.items() if k != "layers"}
    block = params["layers"]["block"]
    for i in range(cfg.num_layers):
        out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], block)
    return out
