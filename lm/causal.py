"""Causal-LM runs: data and tokenizer from the experiment config, for ``lm.train.run``.

    data = load_data(config)           # config.data.kind: "chars" | "sft"
    batch = data.train_batch(batch_size, seed, step)    # lm.data causal_lm batch (numpy)
    for b in data.eval_batches(eval_batch_size): ...

``chars`` (nanoGPT's shakespeare_char): one text file, character vocabulary, the last
``data.eval_fraction`` held out; a training batch is B random windows of ``data.max_len`` + 1
characters, the eval set a fixed list of non-overlapping windows (``data.max_eval_examples``
caps their number, spread evenly over the held-out text). ``sft``: JSONL conversations rendered
with the tokenizer's chat template, loss on assistant tokens, packed into rows of
``data.max_len`` with per-example segment ids and positions (lm.data.sft / packing).

``CharTokenizer`` wraps lm.data's character vocabulary in the part of the Hugging Face tokenizer
interface the rest of lm uses (``__call__`` -> input_ids, ``decode``, ``eos_token_id``,
``save_pretrained`` / ``from_pretrained``), so a character model's workdir decodes with
scripts/decode.py like any other.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from lm import data as lmdata

VOCAB_FILE = "char_vocab.json"


class CharTokenizer:
    """A character vocabulary with the HF tokenizer methods decode and the loop call.

    There are no special tokens: ``eos_token_id``, ``bos_token_id`` and ``pad_token_id`` are
    None (character models stop at ``max_new_tokens`` or a stop string).
    """

    eos_token_id = None
    bos_token_id = None
    pad_token_id = None
    chat_template = None

    def __init__(self, vocab: lmdata.CharTokenizer):
        self.vocab = vocab

    @property
    def vocab_size(self) -> int:
        return self.vocab.vocab_size

    def __len__(self) -> int:
        return self.vocab.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        del add_special_tokens  # no special tokens
        return [int(i) for i in self.vocab.encode(text)]

    def __call__(self, text, add_special_tokens: bool = True, **kwargs) -> dict:
        if isinstance(text, str):
            return {"input_ids": self.encode(text)}
        return {"input_ids": [self.encode(t) for t in text]}

    def decode(self, ids, skip_special_tokens: bool = False, **kwargs) -> str:
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        return self.vocab.decode([i for i in ids if 0 <= i < self.vocab_size])

    def save_pretrained(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.vocab.save(os.path.join(directory, VOCAB_FILE))

    @classmethod
    def from_pretrained(cls, directory: str) -> CharTokenizer:
        return cls(lmdata.CharTokenizer.load(os.path.join(directory, VOCAB_FILE)))

    @staticmethod
    def is_saved_in(directory: str) -> bool:
        return os.path.exists(os.path.join(directory, VOCAB_FILE))


def load_tokenizer(directory: str):
    """The tokenizer a run saved in ``directory``: characters or an HF tokenizer."""
    if CharTokenizer.is_saved_in(directory):
        return CharTokenizer.from_pretrained(directory)
    from lm.tokenizer import load_tokenizer as load_hf

    return load_hf(directory)


@dataclasses.dataclass
class CausalData:
    """A causal-LM dataset as the training loop reads it.

    Attributes:
        kind: "chars" | "sft".
        tokenizer: CharTokenizer or an HF tokenizer (saved into the workdir).
        num_train: training rows per epoch (chars: non-overlapping windows of the train text).
        num_eval: eval rows (0: no evaluation).
        vocab_size: ids the data uses are below this.
        train_batch: ``(batch_size, seed, step) -> batch``, a pure function of its arguments.
        eval_batches: ``batch_size -> iterator of batches`` (padding rows carry loss 0).
        info: numbers worth logging (tokens, truncated and dropped examples).
    """

    kind: str
    tokenizer: Any
    num_train: int
    num_eval: int
    vocab_size: int
    train_batch: Callable[[int, int, int], dict]
    eval_batches: Callable[[int], Iterator[dict]]
    info: dict = dataclasses.field(default_factory=dict)


# Only what the causal task reads: without segment_ids/positions the model runs plain causal
# attention (no per-example mask), which is what unpacked character windows are.
_CHAR_KEYS = ("tokens", "targets", "loss_mask")


def load_data(config) -> CausalData:
    """The causal-LM data of ``config.data`` (checked and tokenized before any model loads).

    Raises:
        lm.data.DataError: a missing, empty or malformed file (naming it), or text too short
            for one window.
        lm.experiment.ConfigError: settings that do not fit the data kind.
    """
    from lm.experiment import ConfigError

    d = config.data
    context = int(d.max_len)
    if context < 1:
        raise ConfigError(f"config.data.max_len={context} must be >= 1")
    if d.kind == "chars":
        files = lmdata.expand_paths(d.train_files) if d.train_files else [None]
        if len(files) != 1:
            raise ConfigError(
                f"config.data.train_files: data.kind='chars' reads one text file, got {files}"
            )
        text = lmdata.load_char_text(files[0], train_fraction=1.0 - float(d.eval_fraction))
        tok = CharTokenizer(text.tokenizer)
        max_eval = int(d.max_eval_examples) or None
        eval_starts = lmdata.text_lm.char_eval_starts(text.eval, context, max_eval)

        def train_batch(batch_size, seed, step):
            b = lmdata.char_train_batch(text.train, batch_size, context, seed, step)
            return {k: b[k] for k in _CHAR_KEYS}

        def eval_batches(batch_size):
            for b in lmdata.char_eval_batches(text.eval, batch_size, context, max_eval):
                yield {k: b[k] for k in _CHAR_KEYS}

        return CausalData(
            "chars",
            tok,
            max(1, len(text.train) // context),
            len(eval_starts),
            tok.vocab_size,
            train_batch,
            eval_batches,
            dict(train_chars=len(text.train), eval_chars=len(text.eval)),
        )

    # SFT: the model's own tokenizer and chat template.
    from lm.experiment import load_tokenizer

    tok = load_tokenizer(config)
    if tok is None:
        raise ConfigError(
            "config.data.kind='sft' needs an HF tokenizer with a chat template: set "
            "config.data.tokenizer (a preset model has none)"
        )
    if d.name == "sst2_instruct":
        train_files = lmdata.bundled_path("sst2_instruct/train.jsonl.gz")
        eval_files = lmdata.bundled_path("sst2_instruct/dev.jsonl.gz")
    elif d.name:
        raise ConfigError(
            f"config.data.name={d.name!r}: data.kind='sft' knows 'sst2_instruct' (bundled) or "
            "'' with data.train_files / data.eval_files"
        )
    else:
        if not d.train_files:
            raise ConfigError(
                "config.data.kind='sft' needs data.train_files (JSONL) or data.name='sst2_instruct'"
            )
        train_files, eval_files = d.train_files, d.eval_files
    train = _load_sft(tok, context, train_files, d.cache_dir, int(d.max_train_examples))
    evals = (
        _load_sft(tok, context, eval_files, d.cache_dir, int(d.max_eval_examples))
        if eval_files
        else None
    )

    def sft_train_batch(batch_size, seed, step):
        return lmdata.packed_train_batch(
            train.examples, train.rows, context, batch_size, seed, step
        )

    def sft_eval_batches(batch_size):
        if evals is None:
            return iter(())
        return lmdata.packed_eval_batches(evals.examples, evals.rows, context, batch_size)

    info = dict(
        train_examples=len(train.examples),
        train_truncated=train.examples.num_truncated,
        train_dropped=train.examples.num_dropped,
    )
    return CausalData(
        "sft",
        tok,
        len(train.rows),
        len(evals.rows) if evals is not None else 0,
        len(tok),
        sft_train_batch,
        sft_eval_batches,
        info,
    )


def _load_sft(tok, context, files, cache_dir, max_examples) -> lmdata.PackedSplit:
    if not max_examples:
        return lmdata.load_sft(tok, context, files, cache_dir=cache_dir)
    from lm.data.packing import pack_rows

    convs = lmdata.read_conversations(files)[:max_examples]
    ex = lmdata.tokenize_conversations(tok, convs, context, cache_dir=cache_dir)
    return lmdata.PackedSplit(ex, pack_rows(ex.input_lengths, context), context, convs)


def _with_vocab(config, data: CausalData):
    """A randomly initialized preset gets the data's vocabulary size unless
    config.model.vocab_size sets one."""
    import copy

    from lm.experiment import is_preset

    if is_preset(config.model.name) and config.model.get("vocab_size") is None:
        config = copy.deepcopy(config)
        config.model.vocab_size = int(data.vocab_size)
    return config


def _check_vocab(cfg, data: CausalData) -> None:
    from lm.experiment import ConfigError

    if data.kind == "chars" and cfg.vocab_size < data.vocab_size:
        raise ConfigError(
            f"config.model.vocab_size={cfg.vocab_size} is smaller than the "
            f"{data.vocab_size} characters of the text"
        )


def preset_model_config(config, data: CausalData):
    """``lm.experiment.preset_model_config`` for a causal-LM run (the data's vocabulary; checked
    against the text's characters), or None for a checkpoint."""
    from lm.experiment import preset_model_config as preset_cfg

    cfg = preset_cfg(_with_vocab(config, data))
    if cfg is not None:
        _check_vocab(cfg, data)
    return cfg


def load_model(config, data: CausalData):
    """``lm.experiment.load_model`` for a causal-LM run: a randomly initialized preset gets the
    data's vocabulary size unless config.model.vocab_size sets one (which must cover it)."""
    from lm.experiment import load_model as load

    model = load(_with_vocab(config, data))
    _check_vocab(model.cfg, data)
    return model
