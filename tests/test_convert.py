"""HF / GGUF import and export, proven by numeric parity with transformers (PyTorch, CPU)."""

import json
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import lm  # noqa: E402
from lm.convert.hf import CheckpointError  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SENTENCES = [
    "a gripping, beautifully shot film",
    "the plot is thin and the jokes fall flat for nearly two hours of screen time",
    "meh",
    "Not bad at all: the actors clearly enjoyed themselves.",
]


def _run(cfg, params, ids, mask, **kw):
    return lm.forward(cfg, params, jnp.asarray(ids), mask=jnp.asarray(mask), **kw)


def _masked_max(a, b, mask):
    return float(np.abs((np.asarray(a) - np.asarray(b)) * mask[..., None]).max())


# ---------------------------------------------------------------------------------------------
# Real checkpoints


@pytest.fixture(scope="module")
def minilm():
    return lm.load("minilm-l6")


def test_minilm_hidden_and_pooled_match_transformers(minilm):
    b = minilm.tokenizer(SENTENCES, padding=True, return_tensors="np")
    assert len(set(b["attention_mask"].sum(1))) == 4  # four different lengths, padded
    out = _run(
        minilm.cfg,
        minilm.params,
        b["input_ids"],
        b["attention_mask"],
        token_types=jnp.asarray(b["token_type_ids"]),
    )
    ref = transformers.AutoModel.from_pretrained(minilm.path).eval()
    with torch.no_grad():
        r = ref(**{k: torch.tensor(v) for k, v in b.items()})
    assert _masked_max(out["hidden"], r.last_hidden_state.numpy(), b["attention_mask"]) < 1e-4
    assert np.abs(np.asarray(out["pooled"]) - r.pooler_output.numpy()).max() < 1e-4


@pytest.fixture(scope="module")
def smollm2():
    return lm.load("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def smollm2_torch(smollm2):
    from conftest import transformers_smollm2

    return transformers_smollm2()


def test_smollm2_gguf_logits_match_transformers(smollm2, smollm2_torch):
    tok = smollm2.tokenizer
    b = tok(
        [
            "The capital of France is",
            "def fibonacci(n):\n    ",
            "Once upon a time, in a land far away, there lived",
        ],
        padding=True,
        padding_side="right",
        return_tensors="np",
    )
    out = _run(smollm2.cfg, smollm2.params, b["input_ids"], b["attention_mask"])
    with torch.no_grad():
        r = smollm2_torch(
            input_ids=torch.tensor(b["input_ids"]), attention_mask=torch.tensor(b["attention_mask"])
        ).logits.numpy()
    assert _masked_max(out["logits"], r, b["attention_mask"]) < 1e-3


def _greedy(cfg, params, ids, n, eos=2):
    """Greedy continuation by full forward passes over a fixed-size buffer (one compile);
    stops after ``eos`` like transformers' generate."""
    import jax

    total = len(ids) + n
    buf = np.zeros((1, total), np.int32)
    buf[0, : len(ids)] = ids
    step = jax.jit(lambda p, x: lm.forward(cfg, p, x)["logits"])
    for i in range(len(ids), total):
        logits = step(params, jnp.asarray(buf))
        buf[0, i] = int(np.argmax(logits[0, i - 1]))
        if buf[0, i] == eos:
            return buf[0, len(ids) : i + 1].tolist()
    return buf[0, len(ids) :].tolist()


def test_smollm2_greedy_chat_continuation_matches_transformers(smollm2, smollm2_torch):
    tok = smollm2.tokenizer
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Tell me a story about a brave robot."}],
        add_generation_prompt=True,
        tokenize=True,
    )["input_ids"]
    ours = _greedy(smollm2.cfg, smollm2.params, ids, 16)
    assert len(ours) == 16  # no early EOS: all 16 tokens compared
    with torch.no_grad():
        ref = smollm2_torch.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)
    assert ours == ref[0, len(ids) :].tolist()


def test_gguf_tokenizer_matches_transformers_gguf_tokenizer(smollm2):
    d, f = os.path.split(smollm2.path)
    ref = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    texts = [
        "Hello world!",
        "  leading spaces and\ttabs\n",
        "numbers 12345 and émojis 🙂",
        "<|im_start|>user\nhi<|im_end|>",
    ]
    for t in texts:
        assert smollm2.tokenizer(t)["input_ids"] == ref(t)["input_ids"], t
    msgs = [{"role": "user", "content": "hi"}]
    assert smollm2.tokenizer.apply_chat_template(msgs, tokenize=False) == ref.apply_chat_template(
        msgs, tokenize=False
    )


# ---------------------------------------------------------------------------------------------
# Random tiny checkpoints of other architectures, written by transformers itself


def _tiny_hf(tmp_path, name, config, model_cls):
    torch.manual_seed(0)
    model = model_cls(config).eval()
    d = str(tmp_path / name)
    model.save_pretrained(d)
    return d, model


def _compare_causal(d, model, bias_check=None):
    m = lm.load(d, tokenizer=False)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 128, (3, 10))
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    out = _run(m.cfg, m.params, ids, mask)
    with torch.no_grad():
        r = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    assert _masked_max(out["logits"], r, mask) < 1e-4
    return m


def test_gpt2_random_tiny(tmp_path):
    c = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
    d, model = _tiny_hf(tmp_path, "gpt2", c, transformers.GPT2LMHeadModel)
    m = _compare_causal(d, model)
    assert m.cfg.family == "gpt2" and m.cfg.activation == "gelu_tanh"


def test_qwen2_random_tiny_with_qkv_bias(tmp_path):
    c = transformers.Qwen2Config(
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        num_hidden_layers=2,
        vocab_size=128,
        tie_word_embeddings=False,
    )
    d, model = _tiny_hf(tmp_path, "qwen2", c, transformers.Qwen2ForCausalLM)
    # Random init leaves biases at zero; make them count.
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    model.save_pretrained(d)
    m = _compare_causal(d, model)
    assert m.cfg.qkv_bias and not m.cfg.tie_embeddings


def test_mistral_random_tiny(tmp_path):
    c = transformers.MistralConfig(
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=1,
        intermediate_size=64,
        num_hidden_layers=2,
        vocab_size=128,
        sliding_window=None,
        head_dim=16,
    )
    d, model = _tiny_hf(tmp_path, "mistral", c, transformers.MistralForCausalLM)
    m = _compare_causal(d, model)
    assert m.cfg.num_kv_heads == 1 and m.cfg.head_dim == 16


@pytest.mark.parametrize(
    "scaling",
    [
        {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
            "rope_theta": 500000.0,
        },
    ],
)
def test_llama_random_tiny_with_rope_scaling(tmp_path, scaling):
    c = transformers.LlamaConfig(
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        num_hidden_layers=2,
        vocab_size=128,
        max_position_embeddings=64,
        rope_parameters=scaling,
        tie_word_embeddings=False,
    )
    d, model = _tiny_hf(tmp_path, "llama", c, transformers.LlamaForCausalLM)
    m = _compare_causal(d, model)
    assert m.cfg.rope_scaling_dict["type"] == scaling["rope_type"]


def test_sequence_classifiers_random_tiny(tmp_path):
    bert = transformers.BertConfig(
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=64,
        num_hidden_layers=2,
        vocab_size=128,
        num_labels=3,
    )
    llama = transformers.LlamaConfig(
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        num_hidden_layers=2,
        vocab_size=128,
        num_labels=3,
        pad_token_id=0,
    )
    ids = np.random.default_rng(1).integers(1, 128, (2, 9))
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    ids[1, 5:] = 0
    for name, c, cls in [
        ("bert", bert, transformers.BertForSequenceClassification),
        ("llama", llama, transformers.LlamaForSequenceClassification),
    ]:
        d, model = _tiny_hf(tmp_path, name, c, cls)
        m = lm.load(d, tokenizer=False)
        assert m.cfg.head == "classification" and not m.missing_head
        out = _run(m.cfg, m.params, ids, mask)["logits"]
        with torch.no_grad():
            r = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
        np.testing.assert_allclose(np.asarray(out), r.numpy(), atol=1e-4)


def test_token_classifier_random_tiny(tmp_path):
    c = transformers.BertConfig(
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=64,
        num_hidden_layers=2,
        vocab_size=128,
        num_labels=5,
    )
    d, model = _tiny_hf(tmp_path, "bert-tok", c, transformers.BertForTokenClassification)
    m = lm.load(d, tokenizer=False)
    ids = np.random.default_rng(2).integers(1, 128, (2, 9))
    mask = np.ones_like(ids)
    out = _run(m.cfg, m.params, ids, mask)["logits"]
    with torch.no_grad():
        r = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    np.testing.assert_allclose(np.asarray(out), r, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Export: lm -> HF directory -> transformers


def test_bert_export_round_trip(minilm, tmp_path):
    out_dir = lm.save_hf_dir(minilm.cfg, minilm.params, str(tmp_path / "minilm"), minilm.tokenizer)
    ref = transformers.AutoModel.from_pretrained(out_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out_dir)
    b = tok(SENTENCES, padding=True, return_tensors="np")
    ours = _run(
        minilm.cfg,
        minilm.params,
        b["input_ids"],
        b["attention_mask"],
        token_types=jnp.asarray(b["token_type_ids"]),
    )
    with torch.no_grad():
        r = ref(**{k: torch.tensor(v) for k, v in b.items()})
    assert _masked_max(ours["hidden"], r.last_hidden_state.numpy(), b["attention_mask"]) < 1e-4


def test_classifier_export_keeps_label_names(tmp_path):
    cfg = lm.preset("tiny-bert", head="classification", num_labels=2)
    params = lm.init_params(cfg, 0)
    d = lm.save_hf_dir(cfg, params, str(tmp_path / "clf"), labels=["negative", "positive"])
    model = transformers.AutoModelForSequenceClassification.from_pretrained(d).eval()
    assert model.config.id2label == {0: "negative", 1: "positive"}
    ids = np.random.default_rng(0).integers(1, 128, (2, 8))
    ours = _run(cfg, params, ids, np.ones_like(ids))["logits"]
    with torch.no_grad():
        r = model(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), r, atol=1e-4)
    back = lm.load(d, tokenizer=False)
    assert back.labels == ["negative", "positive"]


@pytest.fixture(scope="module")
def smollm2_hf_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("convert") / "smollm2-hf")
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "scripts/convert.py"),
            "--model=smollm2-135m-instruct",
            f"--out={out}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    yield out
    shutil.rmtree(out, ignore_errors=True)


def test_convert_script_gguf_to_hf_reproduces_logits_and_greedy(smollm2, smollm2_hf_dir):
    with open(os.path.join(smollm2_hf_dir, "config.json")) as f:
        assert json.load(f)["model_type"] == "llama"
    model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_hf_dir, dtype=torch.float32
    ).eval()
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_hf_dir)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Write a haiku about rain."}],
        add_generation_prompt=True,
        tokenize=True,
    )["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits.numpy()
        gen = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)
    ours = _run(smollm2.cfg, smollm2.params, [ids], np.ones((1, len(ids))))["logits"]
    assert np.abs(np.asarray(ours) - logits).max() < 1e-3
    assert _greedy(smollm2.cfg, smollm2.params, ids, 16) == gen[0, len(ids) :].tolist()


# ---------------------------------------------------------------------------------------------
# Bad input: one clear error naming the file, before anything is built


def _minilm_dir():
    return lm.resolve("minilm-l6")


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(CheckpointError, match=r"config.json: model_type 't5' is not supported"):
        lm.load(str(tmp_path))


def test_missing_config_json(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        lm.load(str(tmp_path))


def test_missing_weights(tmp_path):
    shutil.copy(os.path.join(_minilm_dir(), "config.json"), tmp_path)
    with pytest.raises(CheckpointError, match="no weights found"):
        lm.load(str(tmp_path), tokenizer=False)


def test_shapes_disagree_with_config(tmp_path):
    src = _minilm_dir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(src, f), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 1000
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError,
        match=r"intermediate.dense.weight in model.safetensors: shape \[1536, 384\], config.json implies \[1000, 384\]",
    ):
        lm.load(str(tmp_path), tokenizer=False)


def test_truncated_safetensors(tmp_path):
    src = _minilm_dir()
    shutil.copy(os.path.join(src, "config.json"), tmp_path)
    data = open(os.path.join(src, "model.safetensors"), "rb").read()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: truncated safetensors file"):
        lm.load(str(tmp_path), tokenizer=False)


def test_garbage_safetensors(tmp_path):
    shutil.copy(os.path.join(_minilm_dir(), "config.json"), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="model.safetensors: unreadable safetensors file"):
        lm.load(str(tmp_path), tokenizer=False)


def _same_as_gguf_reader(path, nested=()):
    """lm's GGUF header parser reads what the ``gguf`` package's reader reads (which flattens
    arrays of arrays: ``nested`` keys are compared flattened)."""
    import gguf

    from lm.convert.gguf_reader import GGUFFile

    ours, ref = GGUFFile(str(path)), gguf.GGUFReader(str(path))
    keys = [k for k in ref.fields if not k.startswith("GGUF.")]
    assert list(ours.fields) == keys
    for k in keys:
        got, want = ours.fields[k], ref.fields[k].contents()
        got = [x for row in got for x in row] if k in nested else got
        assert got == want and type(got) is type(want), k
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors):
        assert (a.shape, a.tensor_type, a.data_offset, a.n_bytes) == (
            tuple(b.shape.tolist()), b.tensor_type, b.data_offset, b.n_bytes
        )  # fmt: skip
        assert a.data.dtype == b.data.dtype and np.array_equal(a.data, b.data), a.name
    return ours


def test_gguf_header_parser_equals_the_gguf_package(tmp_path):
    import gguf

    ours = _same_as_gguf_reader(lm.resolve("smollm2-135m-instruct"))
    assert len(ours.fields["tokenizer.ggml.tokens"]) == 49152 and len(ours.tensors) == 272

    # Every value type, nested arrays, a custom alignment, float and quantized tensors.
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    w.add_custom_alignment(64)
    w.add_uint8("u8", 7), w.add_int8("i8", -7), w.add_uint16("u16", 700)
    w.add_int16("i16", -700), w.add_uint32("u32", 70000), w.add_int32("i32", -70000)
    w.add_uint64("u64", 2**40), w.add_int64("i64", -(2**40)), w.add_float32("f32", 0.25)
    w.add_float64("f64", 1e-300), w.add_bool("b", True), w.add_string("s", "héllo")
    w.add_array("ints", [1, 2, 3]), w.add_array("floats", [0.5, 1.5])
    w.add_array("strs", ["a", "", "ü"]), w.add_array("nested", [[1, 2], [3]])
    rng = np.random.default_rng(0)
    w.add_tensor("f32", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((2, 4)).astype(np.float16))
    q = gguf.quantize(
        rng.standard_normal((2, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0
    )
    w.add_tensor("q8", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    ours = _same_as_gguf_reader(tmp_path / "t.gguf", nested={"nested"})
    assert ours.fields["nested"] == [[1, 2], [3]] and ours.fields["s"] == "héllo"


def test_truncated_and_garbage_gguf(tmp_path):
    src = lm.resolve("smollm2-135m-instruct")
    data = open(src, "rb").read()
    short = tmp_path / "short.gguf"
    short.write_bytes(data[: len(data) // 2])
    # The header (and its 98k tokenizer strings) is whole; the second half of the tensors is not.
    with pytest.raises(CheckpointError, match=r"short.gguf: truncated GGUF file \(tensor \S+ ends"):
        lm.load(str(short), tokenizer=False)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(CheckpointError, match="bad.gguf: not a readable GGUF file"):
        lm.load(str(bad), tokenizer=False)


def test_unknown_name_offline_names_what_was_looked_up(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as e:
        lm.load("someone/no-such-model")
    msg = str(e.value)
    assert "local path" in msg and "Hugging Face hub id 'someone/no-such-model'" in msg
    with pytest.raises(CheckpointError, match="known short names"):
        lm.load("no-such-short-name")
