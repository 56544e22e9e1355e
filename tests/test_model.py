"""Model: full-size preset shapes via eval_shape, forward invariants on tiny presets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.config import PRESETS, ModelConfig, preset
from lm.model import count_params, forward, init_params, logical_axes, param_shapes

# Published parameter counts (HF checkpoints; BERT incl. pooler, tied heads counted once).
PUBLISHED = {
    "bert-base": 109_482_240,
    "bert-large": 335_141_888,
    "minilm-l6": 22_713_216,
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
    "smollm2-135m": 134_515_008,
    "llama3-8b": 8_030_261_248,
    "llama-1b": 1_235_814_400,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_full_size_preset_counts_match_published(name):
    assert count_params(preset(name)) == PUBLISHED[name]


def test_llama3_8b_shapes_without_memory():
    shapes = param_shapes(preset("llama3-8b"))
    layer = shapes["layers_0"]
    assert layer["attn"]["q"]["kernel"].shape == (4096, 4096)
    assert layer["attn"]["k"]["kernel"].shape == (4096, 1024)  # 8 kv heads x 128
    assert layer["mlp"]["gate"]["kernel"].shape == (4096, 14336)
    assert shapes["lm_head"]["kernel"].shape == (4096, 128256)
    assert shapes["embed"]["embedding"].shape == (128256, 4096)


def test_every_parameter_has_logical_axes():
    for name in ("tiny", "tiny-bert", "tiny-gpt2"):
        specs = logical_axes(preset(name))
        shapes = param_shapes(preset(name))
        for spec, shape in zip(jax.tree.leaves(specs), jax.tree.leaves(shapes), strict=True):
            assert len(spec) == len(shape.shape)


def test_every_preset_builds():
    for name in PRESETS:
        assert count_params(preset(name)) > 0


def test_bad_model_config_is_one_clear_error():
    with pytest.raises(ValueError, match="num_heads=6 is not a multiple of num_kv_heads=4"):
        ModelConfig(num_heads=6, num_kv_heads=4)
    with pytest.raises(KeyError, match="Unknown model preset 'nope'"):
        preset("nope")


def _tokens(b=2, t=12, v=128, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(1, v, (b, t)), jnp.int32)


def test_causal_model_ignores_the_future():
    cfg = preset("tiny")
    params = init_params(cfg, 0)
    x = _tokens()
    y = x.at[:, 8:].set(5)
    a, b = forward(cfg, params, x)["logits"], forward(cfg, params, y)["logits"]
    np.testing.assert_allclose(a[:, :8], b[:, :8], atol=1e-6)
    assert np.abs(a[:, 8:] - b[:, 8:]).max() > 1e-3


def test_right_padding_does_not_change_real_positions():
    for name in ("tiny", "tiny-bert", "tiny-gpt2"):
        cfg = preset(name)
        params = init_params(cfg, 1)
        x = _tokens(1, 7)
        padded = jnp.concatenate([x, jnp.zeros((1, 5), jnp.int32)], 1)
        mask = jnp.asarray([[1] * 7 + [0] * 5])
        a = forward(cfg, params, x)["hidden"]
        b = forward(cfg, params, padded, mask=mask)["hidden"][:, :7]
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_packed_segments_equal_separate_sequences():
    cfg = preset("tiny")
    params = init_params(cfg, 2)
    a, b = _tokens(1, 5, seed=3), _tokens(1, 7, seed=4)
    packed = jnp.concatenate([a, b], 1)
    seg = jnp.asarray([[1] * 5 + [2] * 7])
    pos = jnp.asarray([list(range(5)) + list(range(7))])
    out = forward(cfg, params, packed, positions=pos, segment_ids=seg)["logits"]
    np.testing.assert_allclose(out[:, :5], forward(cfg, params, a)["logits"], atol=2e-5)
    np.testing.assert_allclose(out[:, 5:], forward(cfg, params, b)["logits"], atol=2e-5)


def test_bfloat16_compute_tracks_float32():
    cfg = preset("tiny")
    params = init_params(cfg, 0)
    x = _tokens()
    ref = forward(cfg, params, x)["logits"]
    bf = forward(cfg.replace(dtype="bfloat16"), params, x)["logits"]
    assert bf.dtype == jnp.float32  # logits are always float32
    assert np.abs(np.asarray(bf) - np.asarray(ref)).max() < 0.05
    p16 = init_params(cfg.replace(param_dtype="bfloat16"), 0)
    assert jax.tree.leaves(p16)[0].dtype == jnp.bfloat16


def test_classification_heads_shapes():
    for name in ("tiny", "tiny-bert"):
        cfg = preset(name, head="classification", num_labels=3)
        params = init_params(cfg, 0)
        mask = jnp.asarray([[1] * 12, [1] * 6 + [0] * 6])
        assert forward(cfg, params, _tokens(), mask=mask)["logits"].shape == (2, 3)
    cfg = preset("tiny-bert", head="token_classification", num_labels=5, pooler=False)
    assert forward(cfg, init_params(cfg, 0), _tokens())["logits"].shape == (2, 12, 5)


def test_decoder_classifier_pools_last_real_token():
    cfg = preset("tiny", head="classification", num_labels=3)
    params = init_params(cfg, 0)
    x = _tokens(1, 6)
    padded = jnp.concatenate([x, jnp.full((1, 4), 7, jnp.int32)], 1)
    mask = jnp.asarray([[1] * 6 + [0] * 4])
    a = forward(cfg, params, x)["logits"]
    b = forward(cfg, params, padded, mask=mask)["logits"]
    np.testing.assert_allclose(a, b, atol=2e-5)


def test_remat_gives_same_gradients():
    cfg = preset("tiny")
    params = init_params(cfg, 0)
    x = _tokens()

    def loss(p, c):
        return forward(c, p, x)["logits"].std()

    g1 = jax.grad(loss)(params, cfg)
    g2 = jax.grad(loss)(params, cfg.replace(remat="full"))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_scan_layers_equals_unrolled_forward_gradients_and_cache():
    from lm.model import init_cache, stack_layers, unstack_layers

    cfg = preset("tiny")
    params = init_params(cfg, 0)
    scfg = cfg.replace(scan_layers=True)
    sparams = stack_layers(scfg, params)
    assert sparams["layers"]["block"]["attn"]["q"]["kernel"].shape == (2, 32, 32)
    spec = logical_axes(scfg)["layers"]["block"]["attn"]["q"]["kernel"]
    assert tuple(spec) == ("layers", "embed", "heads")
    x = _tokens()
    ref = forward(cfg, params, x)["logits"]
    np.testing.assert_allclose(forward(scfg, sparams, x)["logits"], ref, atol=1e-5)
    np.testing.assert_allclose(
        forward(scfg.replace(remat="full"), sparams, x)["logits"], ref, atol=1e-5
    )
    cached = forward(scfg, sparams, x, cache=init_cache(scfg, 2, 16))
    np.testing.assert_allclose(cached["logits"], ref, atol=1e-5)
    g1 = jax.grad(lambda p: forward(cfg, p, x)["logits"].std())(params)
    g2 = unstack_layers(scfg, jax.grad(lambda p: forward(scfg, p, x)["logits"].std())(sparams))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("name,scan", [("tiny", False), ("tiny", True), ("tiny-gpt2", False)])
def test_last_only_equals_the_last_position(name, scan):
    """last_only (a prefill's trimmed last layer) gives the full forward's last position and
    the same cache, with left padding; a classification head refuses it."""
    from lm.model import init_cache, stack_layers

    cfg = preset(name).replace(scan_layers=scan)
    params = init_params(preset(name), 0)
    params = stack_layers(cfg, params) if scan else params
    x = _tokens()
    mask = jnp.ones_like(x).at[1, :3].set(0)
    full = forward(cfg, params, x, mask=mask, cache=init_cache(cfg, 2, 16))
    last = forward(cfg, params, x, mask=mask, cache=init_cache(cfg, 2, 16), last_only=True)
    assert last["logits"].shape == (2, 1, cfg.vocab_size)
    np.testing.assert_allclose(last["logits"][:, 0], full["logits"][:, -1], atol=1e-5)
    np.testing.assert_allclose(last["hidden"][:, 0], full["hidden"][:, -1], atol=1e-5)
    for a, b in zip(jax.tree.leaves(last["cache"]), jax.tree.leaves(full["cache"]), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="last_only"):
        forward(preset("minilm-l6").replace(num_labels=2, head="classification"), {}, x,
                last_only=True)  # fmt: skip


def test_fused_attention_form_equals_dense_mask():
    """The cuDNN fast path's mask rewrite (causal + key lengths), checked with XLA on CPU."""
    from lm.layers import attention_mask, fused_attention

    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 6, 4, 8)), jnp.float32) for _ in range(3))
    valid = jnp.asarray([[1] * 6, [1] * 4 + [0] * 2])
    for causal in (True, False):
        mask = attention_mask(valid, causal, jnp.arange(6))
        dense = jax.nn.dot_product_attention(q, k, v, mask=mask)
        fused = fused_attention(q, k, v, mask, causal, "xla")
        np.testing.assert_allclose(fused[0], dense[0], atol=1e-5)
        np.testing.assert_allclose(fused[1, :4], dense[1, :4], atol=1e-5)  # real rows
    seg = jnp.asarray([[1, 1, 1, 2, 2, 2]] * 2)  # packing: not the standard pattern
    mask = attention_mask(jnp.ones((2, 6)), True, jnp.arange(6), seg, seg)
    np.testing.assert_allclose(
        fused_attention(q, k, v, mask, True, "xla"),
        jax.nn.dot_product_attention(q, k, v, mask=mask),
        atol=1e-6,
    )


def test_dot_attention_equals_jax_attention_values_and_gradients():
    """lm's einsum attention (deferred normalization, grouped-query heads) against
    jax.nn.dot_product_attention, with causal, padding and packing masks."""
    from lm.layers import attention_mask, dot_attention

    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(2, 7, 6, 8)), jnp.float32)  # 6 query heads
    k, v = (jnp.asarray(rng.normal(size=(2, 7, 2, 8)), jnp.float32) for _ in range(2))  # 2 kv
    # (k, v made [B, S, K, H] for jax; dot_attention reads k as [B, K, H, S], v as [B, K, S, H])
    valid = jnp.asarray([[1] * 7, [1] * 5 + [0] * 2])
    seg = jnp.asarray([[1, 1, 1, 2, 2, 2, 2]] * 2)
    masks = [
        attention_mask(valid, True, jnp.arange(7)),
        attention_mask(valid, False, jnp.arange(7)),
        attention_mask(jnp.ones((2, 7)), True, jnp.arange(7), seg, seg),
    ]
    w = jnp.asarray(rng.normal(size=(2, 7, 6, 8)), jnp.float32)
    for mask in masks:
        rows = np.broadcast_to(np.asarray(mask), (2, 1, 7, 7))[:, 0].any(-1)  # sees a key
        ours = dot_attention(q, k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3), mask)
        ref = jax.nn.dot_product_attention(q, k, v, mask=mask)
        np.testing.assert_allclose(np.asarray(ours)[rows], np.asarray(ref)[rows], atol=1e-5)

        def loss(fn, q, k, v, mask=mask, rows=rows):
            o = fn(q, k, v, mask)
            return jnp.sum(jnp.where(jnp.asarray(rows)[:, :, None, None], o * w, 0.0))

        def head_major(q, k, v, m):
            return dot_attention(q, k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3), m)

        g_ours = jax.grad(lambda *a: loss(head_major, *a), argnums=(0, 1, 2))(q, k, v)
        g_ref = jax.grad(
            lambda *a: loss(lambda q, k, v, m: jax.nn.dot_product_attention(q, k, v, mask=m), *a),
            argnums=(0, 1, 2),
        )(q, k, v)
        for a, b in zip(g_ours, g_ref, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5)
