"""Decoding on tiny random models: cache vs full forward, greedy, batching, sampling, bad input."""

import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import lm  # noqa: E402
from lm import decode  # noqa: E402
from lm.decode import DecodeError  # noqa: E402
from lm.sampling import (  # noqa: E402
    Greedy,
    Sample,
    choose,
    filter_logits,
    make_strategy,
    top_k_filter,
    top_p_filter,
)

PRESETS = ["tiny", "tiny-gpt2"]


def random_model(name: str, seed: int = 0):
    """A tiny model whose random weights are large enough to give varied, non-tied logits."""
    cfg = lm.preset(name)
    params = lm.init_params(cfg, seed)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [
        x + 0.3 * jax.random.normal(k, x.shape, x.dtype) if x.ndim >= 2 else x
        for x, k in zip(leaves, keys)
    ]
    return decode.prepare(cfg, jax.tree.unflatten(tree, leaves), "float32")


@pytest.fixture(scope="module", params=PRESETS)
def model(request):
    return random_model(request.param)


PROMPTS = [[3, 17, 42, 9, 100, 5, 77], [11], [64, 2, 8, 90, 91, 92, 93, 1, 4, 6, 7, 8, 120, 33]]


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, params, tokens):
    return lm.forward(cfg, params, tokens)["logits"]


def naive_greedy(cfg, params, prompt, n):
    """Greedy without a cache: a full forward pass over the whole sequence per token (right
    padded to one length, which a causal model never looks at)."""
    ids = list(prompt)
    for _ in range(n):
        tokens = np.zeros((1, 32), np.int32)
        tokens[0, : len(ids)] = ids
        ids.append(int(jnp.argmax(_forward(cfg, params, tokens)[0, len(ids) - 1])))
    return ids[len(prompt) :]


def test_cached_logits_equal_full_forward(model):
    """Prefill a left-padded batch, then feed one token at a time through the cache (the loop's
    own step functions); every position's logits equal the uncached forward pass."""
    cfg, params = model
    seqs = [PROMPTS[0] + [12, 13, 14, 15, 16, 17], PROMPTS[2] + [1, 2, 3, 4, 5, 6]]
    prefix = [7, 14]  # tokens of each row given to the prefill; the rest fed one by one
    steps = 6
    trunk = jax.jit(decode._trunk, static_argnums=0)
    head = jax.jit(decode._lm_head, static_argnums=0)
    tokens, mask = decode._left_pad([s[:k] for s, k in zip(seqs, prefix)], 16, 0)
    cache = lm.init_cache(cfg, 2, 16 + steps)
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    h, cache = trunk(cfg, params, tokens, mask, positions, cache)
    got = [head(cfg, params, h[:, -1])]
    pos = mask.sum(1)
    for j in range(steps - 1):
        tok = np.array([[s[k + j]] for s, k in zip(seqs, prefix)], np.int32)
        h, cache = trunk(cfg, params, tok, np.ones_like(tok), (pos + j)[:, None], cache)
        got.append(head(cfg, params, h[:, 0]))
    for r, (s, k) in enumerate(zip(seqs, prefix)):
        full = _forward(cfg, params, jnp.asarray([s]))[0]  # [T, V]
        for j in range(steps):
            np.testing.assert_allclose(got[j][r], full[k - 1 + j], atol=1e-5, rtol=0)
    # The whole-sequence prefill logits (the model's own head) agree too.
    full = lm.forward(cfg, params, jnp.asarray(tokens), mask=mask, positions=positions)
    np.testing.assert_allclose(got[0], full["logits"][:, -1], atol=1e-5, rtol=0)


def test_greedy_equals_naive_greedy(model):
    cfg, params = model
    gens = decode.generate(cfg, params, PROMPTS, 12)
    for p, g in zip(PROMPTS, gens):
        assert g.token_ids == naive_greedy(cfg, params, p, 12)
        assert g.finish_reason == "length" and g.num_prompt_tokens == len(p)


def test_batched_equals_alone(model):
    cfg, params = model
    together = decode.generate(cfg, params, PROMPTS, 10)
    for p, g in zip(PROMPTS, together):
        [alone] = decode.generate(cfg, params, [p], 10)
        assert alone.token_ids == g.token_ids
    # Several compiled batches (batch_size 2, last one padded) give the same answer.
    split = decode.generate(cfg, params, PROMPTS, 10, batch_size=2)
    assert [g.token_ids for g in split] == [g.token_ids for g in together]


def test_eos_stops_and_is_kept(model):
    cfg, params = model
    [ref] = decode.generate(cfg, params, [PROMPTS[0]], 10)
    eos = ref.token_ids[3]
    first = ref.token_ids.index(eos)
    [g] = decode.generate(cfg, params, [PROMPTS[0]], 10, eos_ids=[eos])
    assert g.token_ids == ref.token_ids[: first + 1]
    assert g.finish_reason == "eos"
    # A batch keeps going for the rows that have not finished.
    gens = decode.generate(cfg, params, PROMPTS, 10, eos_ids=[eos])
    assert gens[0].token_ids == g.token_ids
    for p, gg in zip(PROMPTS[1:], gens[1:]):
        [alone] = decode.generate(cfg, params, [p], 10, eos_ids=[eos])
        assert gg.token_ids == alone.token_ids


def test_streaming_and_should_stop(model):
    cfg, params = model
    [ref] = decode.generate(cfg, params, [PROMPTS[0]], 10)
    seen = []
    [g] = decode.generate(cfg, params, [PROMPTS[0]], 10, on_tokens=lambda r, ids: seen.extend(ids))
    assert seen == g.token_ids == ref.token_ids
    [g] = decode.generate(cfg, params, [PROMPTS[0]], 10, should_stop=lambda r, ids: len(ids) >= 4)
    assert g.finish_reason == "stop" and g.token_ids == ref.token_ids[:4]
    # Callbacks get the prompt's index in the input, across batches.
    streams = {}
    gens = decode.generate(
        cfg, params, PROMPTS, 10, batch_size=2,
        on_tokens=lambda r, ids: streams.setdefault(r, []).extend(ids),
        should_stop=lambda r, ids: r == 2 and len(ids) >= 3,
    )  # fmt: skip
    assert {r: streams[r][: len(g.token_ids)] for r, g in enumerate(gens)} == {
        r: g.token_ids for r, g in enumerate(gens)
    }
    assert [g.finish_reason for g in gens] == ["length", "length", "stop"]
    assert len(gens[2].token_ids) == 3


def test_top_k_1_equals_greedy(model):
    cfg, params = model
    greedy = decode.generate(cfg, params, PROMPTS, 10)
    sampled = decode.generate(cfg, params, PROMPTS, 10, Sample(temperature=0.7, top_k=1), seed=3)
    assert [g.token_ids for g in sampled] == [g.token_ids for g in greedy]


def test_seed_determinism(model):
    cfg, params = model
    s = Sample(temperature=1.5)
    a = decode.generate(cfg, params, PROMPTS, 12, s, seed=1)
    b = decode.generate(cfg, params, PROMPTS, 12, s, seed=1)
    c = decode.generate(cfg, params, PROMPTS, 12, s, seed=2)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]
    # A prompt's samples do not depend on the batch it shares (one key per input row).
    d = decode.generate(cfg, params, PROMPTS, 12, s, seed=1, batch_size=1)
    assert [g.token_ids for g in d] == [g.token_ids for g in a]


# ---- filters, exact numbers ------------------------------------------------------------------


def test_greedy_ids_equal_argmax():
    """Ties go to the lowest id and a NaN wins, exactly as jnp.argmax."""
    from lm.sampling import greedy_ids

    nan = np.nan
    x = jnp.array([[1.0, 5.0, 3.0, 5.0], [2.0, nan, 7.0, nan], [-1.0, -1.0, -1.0, -1.0]])
    np.testing.assert_array_equal(greedy_ids(x), [1, 1, 0])
    np.testing.assert_array_equal(greedy_ids(x), jnp.argmax(x, -1))
    y = jax.random.normal(jax.random.PRNGKey(0), (16, 49152))
    got = jax.jit(greedy_ids)(y)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(got, jnp.argmax(y, -1))


def test_top_k_filter_exact():
    x = jnp.array([[1.0, 5.0, 3.0, 4.0, 2.0], [0.0, 0.0, 1.0, 0.0, -1.0]])
    got = top_k_filter(x, 2)
    inf = -np.inf
    np.testing.assert_array_equal(got[0], [inf, 5.0, inf, 4.0, inf])
    # Ties with the k-th survive (as transformers' TopKLogitsWarper).
    np.testing.assert_array_equal(got[1], [0.0, 0.0, 1.0, 0.0, inf])
    np.testing.assert_array_equal(top_k_filter(x, 0), x)
    np.testing.assert_array_equal(top_k_filter(x, 5), x)


def test_top_p_filter_exact():
    probs = np.array([0.05, 0.5, 0.15, 0.2, 0.1])
    x = jnp.log(jnp.asarray(probs))[None]
    inf = -np.inf
    keep = lambda p: np.isfinite(np.asarray(top_p_filter(x, p))[0]).tolist()  # noqa: E731
    # Descending: 0.5, 0.2, 0.15, 0.1, 0.05; mass before each: 0, 0.5, 0.7, 0.85, 0.95.
    assert keep(0.3) == [False, True, False, False, False]
    assert keep(0.6) == [False, True, False, True, False]
    assert keep(0.8) == [False, True, True, True, False]
    assert keep(0.9) == [False, True, True, True, True]
    assert keep(0.99) == [True] * 5
    assert keep(1.0) == [True] * 5
    np.testing.assert_allclose(top_p_filter(x, 0.6)[0], [inf, np.log(0.5), inf, np.log(0.2), inf])


def test_filter_order_temperature_top_k_top_p():
    x = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.2, 0.1]]))
    # top_k=3 keeps 0.5, 0.2, 0.15, renormalized 0.588, 0.235, 0.176; top_p=0.7 then keeps 2.
    got = filter_logits(x, Sample(temperature=1.0, top_k=3, top_p=0.7))
    assert np.isfinite(np.asarray(got[0])).tolist() == [False, True, False, True, False]
    # Temperature divides the logits before filtering.
    np.testing.assert_allclose(filter_logits(x, Sample(temperature=2.0))[0], x[0] / 2, rtol=1e-6)


def test_sampling_follows_filtered_distribution():
    x = jnp.log(jnp.array([0.05, 0.5, 0.15, 0.2, 0.1]))
    keys = jax.random.split(jax.random.key(0), 4000)
    draws = np.asarray(choose(jnp.broadcast_to(x, (4000, 5)), Sample(top_p=0.6), keys))
    assert set(draws.tolist()) == {1, 3}
    assert abs((draws == 1).mean() - 0.5 / 0.7) < 0.03
    assert choose(x[None], Greedy()).tolist() == [1]


# ---- bad input: one clear message each -------------------------------------------------------


def test_unknown_sampling_method():
    with pytest.raises(ValueError, match=r"Unknown sampling method 'beam'.*greedy.*sample"):
        make_strategy("beam")


@pytest.mark.parametrize("p", [0.0, -0.1, 1.5])
def test_top_p_out_of_range(p):
    with pytest.raises(ValueError, match=r"top_p=.* must lie in \(0, 1\]"):
        Sample(top_p=p)


def test_bad_temperature_and_top_k():
    with pytest.raises(ValueError, match="temperature=0.0 must be > 0"):
        Sample(temperature=0.0)
    with pytest.raises(ValueError, match="top_k=-1 must be an integer >= 0"):
        Sample(top_k=-1)


@pytest.mark.parametrize("n", [0, -3])
def test_max_new_tokens_below_one(model, n):
    cfg, params = model
    with pytest.raises(DecodeError, match=f"max_new_tokens={n} must be >= 1"):
        decode.generate(cfg, params, PROMPTS, n)


def test_empty_prompt(model):
    cfg, params = model
    with pytest.raises(DecodeError, match="prompt 1 is empty"):
        decode.generate(cfg, params, [[1, 2], []], 4)
    with pytest.raises(DecodeError, match="no prompts"):
        decode.generate(cfg, params, [], 4)


def test_prompt_longer_than_context(model):
    cfg, params = model  # max_len 128
    long = list(np.arange(200) % 100 + 1)
    with pytest.raises(DecodeError, match=r"prompt 0 has 200 tokens.*at most 120 fit.*truncat"):
        decode.generate(cfg, params, [long], 8)
    [g] = decode.generate(cfg, params, [long], 8, truncate=True)
    assert g.truncated == 80 and g.num_prompt_tokens == 120
    [ref] = decode.generate(cfg, params, [long[80:]], 8)
    assert g.token_ids == ref.token_ids
    # A context smaller than the model's also bounds the prompt.
    with pytest.raises(DecodeError, match="at most 24 fit the context of 32"):
        decode.generate(cfg, params, [long[:30]], 8, context=32)
    with pytest.raises(DecodeError, match="leaves no room for a prompt"):
        decode.generate(cfg, params, [[1]], 128)


def naive_sliding_greedy(cfg, params, prompt, n, w):
    """nanoGPT's sample loop: each token from a full forward pass over the last w tokens."""
    ids = list(prompt)
    for _ in range(n):
        window = ids[-w:]
        tokens = np.zeros((1, 32), np.int32)
        tokens[0, : len(window)] = window
        ids.append(int(jnp.argmax(_forward(cfg, params, tokens)[0, len(window) - 1])))
    return ids[len(prompt) :]


def test_sliding_window_equals_cropped_forward(model):
    """slide=True writes past the context (learned positions included): each token equals a
    full forward pass over the last `context` tokens; a longer prompt keeps its last ones."""
    cfg, params = model
    prompts = PROMPTS + [list(np.arange(20) % 50 + 1)]
    with pytest.raises(DecodeError, match="sliding window"):
        decode.generate(cfg, params, prompts, 30, context=16)
    gens = decode.generate(cfg, params, prompts, 30, context=16, slide=True)
    for p, g in zip(prompts, gens):
        assert g.token_ids == naive_sliding_greedy(cfg, params, p[-16:], 30, 16)
        assert g.finish_reason == "length" and len(g.token_ids) == 30
        assert g.num_prompt_tokens == min(len(p), 16) and g.truncated == max(len(p) - 16, 0)
    # A request that fits decodes through the KV cache as without slide.
    fit = decode.generate(cfg, params, PROMPTS, 8, slide=True)
    assert [g.token_ids for g in fit] == [
        g.token_ids for g in decode.generate(cfg, params, PROMPTS, 8)
    ]
    # Sampling on the window repeats for a seed; EOS and streaming work as in the cached loop.
    s = Sample(temperature=1.5)
    a = decode.generate(cfg, params, PROMPTS, 40, s, seed=4, context=16, slide=True)
    b = decode.generate(cfg, params, PROMPTS, 40, s, seed=4, context=16, slide=True)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    eos = gens[0].token_ids[20]
    seen = []
    [g] = decode.generate(
        cfg, params, [prompts[0]], 30, context=16, slide=True, eos_ids=[eos],
        on_tokens=lambda r, ids: seen.extend(ids),
    )  # fmt: skip
    first = gens[0].token_ids.index(eos)
    assert g.token_ids == gens[0].token_ids[: first + 1] and g.finish_reason == "eos"
    assert seen[: len(g.token_ids)] == g.token_ids


def test_token_ids_outside_vocab(model):
    cfg, params = model
    with pytest.raises(DecodeError, match=r"outside the vocabulary \[0, 128\)"):
        decode.generate(cfg, params, [[1, 500]], 4)


def test_encoder_cannot_decode():
    cfg = lm.preset("tiny-bert")
    with pytest.raises(DecodeError, match="LM head|causal"):
        decode.prepare(cfg, params=None)


def test_workdir_hook(tmp_path):
    (tmp_path / "config.json").write_text('{"model": {"preset": "tiny"}}')
    assert decode.is_workdir(str(tmp_path))
    # A workdir goes to lm.workdir.load_workdir (or says it is missing), never to the HF loader.
    with pytest.raises((NotImplementedError, lm.CheckpointError), match="load_workdir|run dir"):
        decode.load_for_decode(str(tmp_path))
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "llama"}')
    assert not decode.is_workdir(str(hf))


def test_bfloat16_decodes(model):
    cfg, params = model
    cfg16, params16 = decode.prepare(cfg, params, "bfloat16")
    [g] = decode.generate(cfg16, params16, [PROMPTS[0]], 6)
    assert len(g.token_ids) == 6
    assert jax.tree.leaves(params16)[0].dtype == jnp.bfloat16


# ---- the script's config and prompt checks (no model needed: they run before loading) -------


def _script():
    from test_decode_smollm2 import load_script

    return load_script()


def _config(**kw):
    from configs.decode import get_config

    c = get_config()
    c.compilation_cache = ""
    for k, v in kw.items():
        c[k] = v
    return c


def test_prompt_file_not_utf8(tmp_path):
    from lm.chat import read_prompts

    f = tmp_path / "p.txt"
    f.write_bytes(b"first prompt\nsecond \xff\xfe prompt\n")
    with pytest.raises(DecodeError, match=r"not UTF-8 text \(byte 0xff at offset 20, line 2\)"):
        read_prompts(str(f))
    f.write_text("a\n\nb\n", encoding="utf-8")
    with pytest.raises(DecodeError, match="line 2: prompt is empty"):
        read_prompts(str(f))
    f.write_text("\ufeffone\ntwo\n\n", encoding="utf-8")
    assert read_prompts(str(f)) == ["one", "two"]
    f.write_text("\n", encoding="utf-8")
    with pytest.raises(DecodeError, match="holds no prompt"):
        read_prompts(str(f))
    with pytest.raises(DecodeError, match="cannot read"):
        read_prompts(str(tmp_path / "missing.txt"))


def test_script_rejects_bad_config_before_loading(tmp_path):
    script = _script()
    no_model = "/nonexistent/model"  # would fail loudly if anything tried to load it
    cases = [
        (dict(prompt="   "), "config.prompt: prompt is empty"),
        (dict(prompt="caf\udcff"), "not valid UTF-8"),
        (dict(prompt="x", sampling="beam"), "Unknown sampling method 'beam'"),
        (dict(prompt="x", sampling="sample", top_p=1.5), r"top_p=1.5 must lie in \(0, 1\]"),
        (dict(prompt="x", sampling="sample", top_p=0.0), r"top_p=0.0 must lie in \(0, 1\]"),
        (dict(prompt="x", max_new_tokens=0), "max_new_tokens=0 must be an integer >= 1"),
        (dict(prompt="x", dtype="int8"), "config.dtype='int8'"),
        (dict(prompt="x", prompt_file="f.txt"), "not both"),
        (dict(output="o.jsonl"), "needs config.prompt or config.prompt_file"),
    ]
    for kw, msg in cases:
        with pytest.raises(DecodeError, match=msg):
            script.run(_config(model=no_model, **kw))


def test_script_workdir_model_message(tmp_path):
    (tmp_path / "config.json").write_text('{"task": "causal_lm"}')
    with pytest.raises((NotImplementedError, lm.CheckpointError), match="load_workdir|run dir"):
        _script().run(_config(model=str(tmp_path), prompt="hi"))
