"""LoRA: a zero-initialized adapter is the base model; merging adapters changes nothing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import lora
from lm.config import preset
from lm.model import forward, init_params


def _x():
    return jnp.asarray(np.random.default_rng(0).integers(1, 128, (2, 10)), jnp.int32)


def test_zero_initialized_adapters_equal_base_model():
    base_cfg = preset("tiny")
    base = init_params(base_cfg, 0)
    cfg = lora.with_lora(base_cfg, rank=4, targets=("q", "v", "down"))
    params = lora.add_adapters(cfg, base, 1)
    assert params["layers_0"]["attn"]["q"]["lora_a"].shape == (32, 4)
    assert float(np.abs(params["layers_0"]["attn"]["q"]["lora_b"]).max()) == 0.0
    np.testing.assert_array_equal(
        forward(cfg, params, _x())["logits"], forward(base_cfg, base, _x())["logits"]
    )


def test_merged_adapters_equal_unmerged_model():
    cfg = lora.with_lora(preset("tiny"), rank=4, alpha=8.0, targets=("q", "k", "v", "o", "up"))
    params = lora.add_adapters(cfg, init_params(preset("tiny"), 0), 1)
    # Pretend training moved B away from zero.
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: (
            x + 0.05 * jax.random.normal(jax.random.PRNGKey(len(str(p))), x.shape)
            if p[-1].key == "lora_b"
            else x
        ),
        params,
    )
    merged_cfg, merged = lora.merge(cfg, params)
    assert merged_cfg.lora_rank == 0 and "lora_a" not in merged["layers_0"]["attn"]["q"]
    a = forward(cfg, params, _x())["logits"]
    b = forward(merged_cfg, merged, _x())["logits"]
    assert np.abs(np.asarray(a) - np.asarray(b)).max() < 1e-4
    assert (
        np.abs(
            np.asarray(a)
            - np.asarray(forward(preset("tiny"), init_params(preset("tiny"), 0), _x())["logits"])
        ).max()
        > 1e-3
    )


def test_trainable_mask_split_join():
    cfg = lora.with_lora(preset("tiny"), rank=2)
    params = lora.add_adapters(cfg, init_params(preset("tiny"), 0))
    mask = lora.trainable_mask(params)
    assert mask["layers_1"]["attn"]["v"]["lora_b"] and not mask["layers_1"]["attn"]["v"]["kernel"]
    adapters, base = lora.split(params)
    n = sum(x.size for x in jax.tree.leaves(adapters))
    assert n == 2 * ((32 * 2 + 2 * 32) + (32 * 2 + 2 * 16))  # layers x (q: A+B, v: A+B)
    rejoined = lora.join(adapters, base)
    for x, y in zip(jax.tree.leaves(rejoined), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(x, y)


def test_bad_lora_settings():
    with pytest.raises(ValueError, match=r"LoRA targets \['qkv'\] are not Dense modules"):
        lora.with_lora(preset("tiny"), rank=4, targets=("qkv",))
    with pytest.raises(ValueError, match="rank must be >= 1"):
        lora.with_lora(preset("tiny"), rank=0)
