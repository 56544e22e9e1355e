"""Instruction (SFT) data: JSONL conversations, rendered with the tokenizer's chat template,
loss on assistant tokens only, packed into rows (``lm.data.packing``).

A JSONL row is either ``{"prompt": ..., "response": ..., "system": ... (optional)}`` or
``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``.

Assistant tokens are found from the rendered text, not from the template: for each assistant
turn i, ``template(messages[:i], add_generation_prompt=True)`` must be a prefix of
``template(messages[:i + 1])``, and the characters between the two (the reply and its
end-of-turn marker, so the model learns to stop) are the assistant span. Tokens whose first
character lies in a span get loss. This needs no ``{% generation %}`` markers, which most
templates (SmolLM2's among them) lack.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from lm.data import cache
from lm.data.errors import DataError
from lm.data.files import PathSpec, expand_paths, read_jsonl
from lm.data.packing import LMExamples, pack_rows
from lm.data.tokenize import tokenizer_fingerprint

ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class Conversation:
    """One training conversation.

    Attributes:
      messages: ({"role": ..., "content": ...}, ...) with at least one assistant turn.
      where: "file:line" it came from.
    """

    messages: tuple[dict, ...]
    where: str

    @property
    def prompt(self) -> list[dict]:
        """The messages before the last assistant turn (what a model is asked to continue)."""
        last = max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        return list(self.messages[:last])

    @property
    def response(self) -> str:
        """The content of the last assistant turn (the reference answer)."""
        return [m for m in self.messages if m["role"] == "assistant"][-1]["content"]


def read_conversations(files: PathSpec) -> list[Conversation]:
    """Reads conversations from JSONL files (path, glob, list or comma-separated string).

    Raises:
      DataError naming file:line for a row that is not an object, lacks prompt/response or
      messages, has a message without a role in ROLES or without string content, has no
      assistant turn, or has empty text.
    """
    out = []
    for path in expand_paths(files):
        for line, obj in read_jsonl(path):
            out.append(Conversation(_messages(obj, f"{path}:{line}"), f"{path}:{line}"))
    if not out:
        raise DataError(f"no conversations in {files!r}")
    return out


def _messages(obj, where: str) -> tuple[dict, ...]:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        out = []
        for k, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise DataError(f"{where}: messages[{k}] needs a 'role' in {ROLES}")
            if not isinstance(m.get("content"), str) or not m["content"].strip():
                raise DataError(f"{where}: messages[{k}] needs a non-empty string 'content'")
            out.append({"role": m["role"], "content": m["content"]})
        if not any(m["role"] == "assistant" for m in out):
            raise DataError(f"{where}: no assistant message, so nothing to learn")
        return tuple(out)
    if "prompt" in obj or "response" in obj:
        for field in ("prompt", "response"):
            if not isinstance(obj.get(field), str) or not obj[field].strip():
                raise DataError(f"{where}: {field!r} must be a non-empty string")
        system = obj.get("system")
        if system is not None and not isinstance(system, str):
            raise DataError(f"{where}: 'system' must be a string")
        msgs = [{"role": "system", "content": system}] if system else []
        msgs += [
            {"role": "user", "content": obj["prompt"]},
            {"role": "assistant", "content": obj["response"]},
        ]
        return tuple(msgs)
    raise DataError(
        f"{where}: expected 'prompt' and 'response' fields or a 'messages' list; got keys {sorted(obj)}"
    )


def render(tokenizer, messages) -> tuple[str, list[tuple[int, int]]]:
    """The chat-template text of a conversation and its assistant character spans [start, end)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template (set tokenizer.chat_template)")
    messages = list(messages)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(
            messages[:i], tokenize=False, add_generation_prompt=True
        )
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (through.startswith(before) and full.startswith(through)):
            raise DataError(
                "the chat template does not render a conversation as a prefix of its extension, "
                "so assistant tokens cannot be located"
            )
        spans.append((len(before), len(through)))
    return full, spans


def tokenize_conversations(
    tokenizer,
    conversations: list[Conversation],
    max_len: int,
    *,
    cache_dir: str | None = None,
    use_cache: bool = True,
) -> LMExamples:
    """Tokenizes conversations for packing into rows of ``max_len`` positions.

    Args:
      tokenizer: a transformers fast tokenizer with a chat template.
      conversations: from ``read_conversations``.
      max_len: T, the row length. An example keeps at most T + 1 tokens (T inputs, T
        targets); longer ones are cut at the end and counted, and dropped (counted too) if no
        assistant token is left among the targets.
      cache_dir: cache root (default ``default_cache_dir()``); entry
        ``<cache_dir>/sft_tokens/<hash>.npz``.
      use_cache: False to neither read nor write the cache.

    Returns:
      The examples, with ``loss`` = 1 on assistant tokens.
    """
    if not conversations:
        raise DataError("no conversations to tokenize")
    data_key = cache.hash_texts(json.dumps(c.messages, sort_keys=True) for c in conversations)
    name = cache.fingerprint("sft", tokenizer_fingerprint(tokenizer), data_key, max_len)
    path = os.path.join(cache_dir or cache.default_cache_dir(), "sft_tokens", name + ".npz")
    cached = cache.load_npz(path) if use_cache else None
    if cached is not None:
        return LMExamples(
            cached["ids"],
            cached["loss"],
            cached["offsets"],
            int(cached["pad_id"]),
            int(cached["num_truncated"]),
            int(cached["num_dropped"]),
        )
    out = _tokenize(tokenizer, conversations, max_len)
    if use_cache:
        cache.save_npz(
            path, {f.name: np.asarray(getattr(out, f.name)) for f in dataclasses.fields(out)}
        )
    return out


def _tokenize(tokenizer, conversations, max_len) -> LMExamples:
    texts, spans = [], []
    for c in conversations:
        try:
            text, s = render(tokenizer, c.messages)
        except DataError as e:
            raise DataError(f"{c.where}: {e}") from None
        texts.append(text)
        spans.append(s)
    # The template already holds the special tokens (BOS, turn markers): add none.
    enc = tokenizer(
        texts, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False
    )
    ids, loss, truncated, dropped = [], [], 0, 0
    for toks, offs, sp in zip(enc["input_ids"], enc["offset_mapping"], spans):
        starts = np.asarray([o[0] for o in offs], np.int64)
        ends = np.asarray([o[1] for o in offs], np.int64)
        flag = np.zeros(len(toks), np.uint8)
        for a, b in sp:
            flag[(starts >= a) & (starts < b) & (ends > starts)] = 1
        if len(toks) > max_len + 1:
            toks, flag = toks[: max_len + 1], flag[: max_len + 1]
            truncated += 1
        if not flag[1:].any():
            dropped += 1
            continue
        ids.append(np.asarray(toks, np.int32))
        loss.append(flag)
    if not ids:
        raise DataError(f"no conversation has an assistant token within max_len={max_len}")
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in ids])]).astype(np.int64)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return LMExamples(
        np.concatenate(ids), np.concatenate(loss), offsets, int(pad_id), truncated, dropped
    )


@dataclasses.dataclass(frozen=True)
class PackedSplit:
    """Conversations tokenized and packed into rows, ready for ``lm.data.packing`` batches.

    Attributes:
      examples: the tokenized examples (``num_truncated`` / ``num_dropped`` for a warning).
      rows: example indices per row of ``row_len`` positions.
      row_len: T.
      conversations: the source conversations (prompts and reference answers, e.g. for
        generation-based evaluation).
    """

    examples: LMExamples
    rows: list[np.ndarray]
    row_len: int
    conversations: list[Conversation]


def load_sft(
    tokenizer, row_len: int, files: PathSpec, *, cache_dir: str | None = None
) -> PackedSplit:
    """Reads, tokenizes (cached) and packs instruction data.

    Batches: ``packed_train_batch(s.examples, s.rows, s.row_len, batch_size, seed, step)`` and
    ``packed_eval_batches(s.examples, s.rows, s.row_len, batch_size)``.
    """
    convs = read_conversations(files)
    examples = tokenize_conversations(tokenizer, convs, row_len, cache_dir=cache_dir)
    return PackedSplit(examples, pack_rows(examples.input_lengths, row_len), row_len, convs)
