"""Text in, text out: prompts (plain or chat-templated), stop strings, streaming, interactive chat.

``lm.decode`` works on token ids; this module is the text layer above it that
``scripts/decode.py`` drives:

    dec = TextDecoder.from_config(config)        # the ml_collections decode config
    rows = dec.complete(["Once upon a time"])    # [{"prompt", "completion", "token_ids", ...}]
    dec.stream("Once upon a time", sys.stdout.write)
    dec.interactive(sys.stdin, sys.stdout)       # multi-turn chat with the chat template
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from lm import decode
from lm.decode import DecodeError
from lm.sampling import Strategy, make_strategy


def check_text(text: Any, where: str) -> str:
    """``text`` if it is a usable prompt, else a DecodeError naming ``where`` it came from."""
    if not isinstance(text, str):
        raise DecodeError(f"{where}: a prompt must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        # Command-line bytes that are not UTF-8 arrive as lone surrogates (PEP 383).
        raise DecodeError(
            f"{where}: prompt is not valid UTF-8 (undecodable byte at character {e.start})"
        ) from None
    if not text.strip():
        raise DecodeError(f"{where}: prompt is empty; give some text to continue")
    return text


def read_prompts(path: str) -> list[str]:
    """One prompt per line of a UTF-8 text file (a trailing newline is not a prompt).

    Raises:
        DecodeError: for a missing file, bytes that are not UTF-8 (naming the line and byte
            offset), a blank line inside the file, or a file with no prompt.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DecodeError(f"prompt_file {path!r}: cannot read ({e.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DecodeError(
            f"prompt_file {path!r}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
            f"{e.start}, line {line}); save the file as UTF-8"
        ) from None
    if text.startswith("\ufeff"):
        text = text[1:]  # a UTF-8 byte order mark is not part of the first prompt
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise DecodeError(f"prompt_file {path!r}: holds no prompt (one prompt per line)")
    return [check_text(line, f"prompt_file {path!r} line {i}") for i, line in enumerate(lines, 1)]


def build_prompt(
    tokenizer,
    text: str,
    chat: bool = False,
    system: str = "",
    history: Sequence[dict[str, str]] = (),
) -> list[int]:
    """Token ids of a prompt.

    Args:
        tokenizer: an HF tokenizer.
        text: the prompt; with ``chat``, the user's message.
        chat: apply the tokenizer's chat template: ``history`` + a user turn, then the
            generation prompt (the assistant header).
        system: an optional system message (chat only; empty keeps the template's default).
        history: earlier turns as ``{"role", "content"}`` dicts (chat only).

    Raises:
        DecodeError: when ``chat`` is set and the tokenizer has no chat template.
    """
    if not chat:
        return list(tokenizer(text)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise DecodeError("chat=True, but this model's tokenizer has no chat template")
    messages = [{"role": "system", "content": system}] if system else []
    messages += [*history, {"role": "user", "content": text}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # The template writes the special tokens itself; the tokenizer must not add a BOS again.
    return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])


class _Detokenizer:
    """Incremental decoding of a growing id list into text, holding back a partial character."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.sent = tokenizer, [], 0

    def push(self, ids: list[int]) -> str:
        self.ids += ids
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence; wait for the next token
            return ""
        new, self.sent = text[self.sent :], len(text)
        return new


@dataclasses.dataclass
class TextDecoder:
    """A loaded model with decoding settings: text prompts in, completions out."""

    cfg: Any
    params: Any
    tokenizer: Any
    strategy: Strategy
    max_new_tokens: int = 128
    eos_ids: Sequence[int] = ()
    stop_strings: Sequence[str] = ()
    seed: int = 0
    chat: bool = False
    system: str = ""
    context: int = 0
    truncate: bool = False
    slide: bool = False
    batch_size: int = 8

    @classmethod
    def from_config(cls, config, pretrained=None) -> TextDecoder:
        """Validate the decode config (before loading anything) and load its model.

        Raises:
            DecodeError: for an invalid setting, naming the ``config`` key.
        """
        strategy, settings = settings_from_config(config)
        if pretrained is None:
            pretrained = decode.load_for_decode(config.model)
        cfg, params = decode.prepare(pretrained.cfg, pretrained.params, config.dtype)
        eos = decode.eos_ids_of(pretrained, extra=tuple(config.get("eos_ids", ())))
        return cls(cfg, params, pretrained.tokenizer, strategy, eos_ids=eos, **settings)

    def _kwargs(self) -> dict:
        return dict(
            seed=self.seed,
            eos_ids=self.eos_ids,
            context=self.context,
            truncate=self.truncate,
            slide=self.slide,
        )

    def encode(self, text: str, where: str = "prompt", history=()) -> list[int]:
        return build_prompt(
            self.tokenizer, check_text(text, where), self.chat, self.system, history
        )

    def complete(self, prompts: Sequence[str]) -> list[dict]:
        """One JSON-ready row per prompt: prompt, completion, token_ids, num_prompt_tokens,
        finish_reason, timings (seconds: compile, prefill, decode of its batch; tokens_per_s)."""
        ids = [self.encode(p, f"prompt {i}") for i, p in enumerate(prompts)]
        checker = decode.stop_string_checker(self.tokenizer, self.stop_strings)
        gens = decode.generate(
            self.cfg,
            self.params,
            ids,
            self.max_new_tokens,
            self.strategy,
            batch_size=self.batch_size,
            should_stop=checker,
            **self._kwargs(),
        )
        return [self._row(p, g) for p, g in zip(prompts, gens)]

    def _row(self, prompt: str, g: decode.Generation) -> dict:
        text = self.tokenizer.decode(g.token_ids, skip_special_tokens=True)
        text, _ = decode.cut_at_stop(text, self.stop_strings)
        t = g.timings
        run = t.get("prefill", 0.0) + t.get("decode", 0.0)
        timings = {k: round(v, 4) for k, v in t.items()}
        timings["tokens_per_s"] = round(len(g.token_ids) / run, 2) if run > 0 else None
        return {
            "prompt": prompt,
            "completion": text,
            "token_ids": g.token_ids,
            "num_prompt_tokens": g.num_prompt_tokens,
            "truncated_prompt_tokens": g.truncated,
            "finish_reason": g.finish_reason,
            "timings": timings,
        }

    def stream(self, prompt: str, write: Callable[[str], Any], history=()) -> dict:
        """Generate for one prompt, writing the completion text as tokens arrive."""
        ids = self.encode(prompt, "prompt", history)
        detok = _Detokenizer(self.tokenizer)
        stops = [s for s in self.stop_strings if s]
        held = [""]  # text not yet written: it may be the start of a stop string
        finished = [False]

        def on_tokens(row: int, new: list[int]):
            if finished[0]:
                return
            text = held[0] + detok.push(new)
            cut, hit = decode.cut_at_stop(text, stops)
            if hit:
                write(cut)
                held[0], finished[0] = "", True
                return
            keep = max((_overlap(text, s) for s in stops), default=0)
            write(text[: len(text) - keep])
            held[0] = text[len(text) - keep :]

        checker = decode.stop_string_checker(self.tokenizer, stops)
        [g] = decode.generate(
            self.cfg,
            self.params,
            [ids],
            self.max_new_tokens,
            self.strategy,
            on_tokens=on_tokens,
            should_stop=checker,
            **self._kwargs(),
        )
        if held[0] and not finished[0]:
            write(held[0])
        return self._row(prompt, g)

    def interactive(self, stdin: TextIO, stdout: TextIO) -> None:
        """A multi-turn chat on a terminal: one user message per line, empty line or EOF ends.

        Each turn re-encodes the whole conversation with the chat template (the prompt is
        re-prefilled; the cache is not kept across turns).
        """
        if not self.chat:
            self.chat = bool(getattr(self.tokenizer, "chat_template", None))
        history: list[dict[str, str]] = []
        mode = "chat" if self.chat else "completion"
        stdout.write(f"[{mode} mode; an empty line or Ctrl-D quits]\n")
        while True:
            stdout.write("> ")
            stdout.flush()
            line = stdin.readline()
            if not line or not line.strip():
                break
            t0 = time.perf_counter()

            def write(s):
                stdout.write(s)
                stdout.flush()

            try:
                row = self.stream(line.rstrip("\n"), write, history if self.chat else ())
            except DecodeError as e:
                stdout.write(f"error: {e}\n")
                continue
            stdout.write(f"\n[{len(row['token_ids'])} tokens, {time.perf_counter() - t0:.1f} s]\n")
            if self.chat:
                history += [
                    {"role": "user", "content": line.rstrip("\n")},
                    {"role": "assistant", "content": row["completion"]},
                ]


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``stop``."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


def settings_from_config(config) -> tuple[Strategy, dict]:
    """The sampling strategy and TextDecoder settings of a decode config, validated.

    Raises:
        DecodeError: naming the config key and what was expected.
    """
    try:
        strategy = make_strategy(config.sampling, config.temperature, config.top_k, config.top_p)
    except ValueError as e:
        raise DecodeError(f"config.sampling/temperature/top_k/top_p: {e}") from None
    n = config.max_new_tokens
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DecodeError(f"config.max_new_tokens={n!r} must be an integer >= 1")
    if config.dtype not in decode.DTYPES:
        raise DecodeError(f"config.dtype={config.dtype!r} is not one of {list(decode.DTYPES)}")
    if config.batch_size < 1:
        raise DecodeError(f"config.batch_size={config.batch_size} must be >= 1")
    if config.max_len < 0:
        raise DecodeError(f"config.max_len={config.max_len} must be >= 0 (0: the model's)")
    stops = config.stop_strings
    if isinstance(stops, str):
        stops = (stops,)
    return strategy, dict(
        max_new_tokens=n,
        stop_strings=tuple(s for s in stops if s),
        seed=int(config.seed),
        chat=bool(config.chat),
        system=config.system,
        context=int(config.max_len),
        truncate=bool(config.truncate),
        slide=bool(config.get("slide", False)),
        batch_size=int(config.batch_size),
    )
