"""Data pipeline: local files and TFDS (no TensorFlow) -> tokens -> fixed-shape numpy batches.

Text classification::

    from lm import data
    ds = data.load_classification(tokenizer, 128, **data.sst2_files())
    buckets = data.length_buckets(128)
    batch = data.classification_train_batch(ds.train, 32, seed=0, step=k, buckets=buckets)

Causal LM: ``load_char_text`` + ``char_train_batch`` (character level, tiny Shakespeare);
``load_sft`` (read, tokenize with the chat template, pack) + ``packed_train_batch`` /
``packed_eval_batches`` (instruction data). Every training batch is a pure function of
(seed, step).
"""

from lm.data.batches import (
    classification_batch,
    classification_eval_batches,
    classification_train_batch,
    epoch_order,
    eval_index_batches,
    length_buckets,
    num_train_steps,
    split_microbatches,
    steps_per_epoch,
    train_indices,
)
from lm.data.cache import default_cache_dir
from lm.data.classification import ClassificationData, load_classification, sst2_files
from lm.data.errors import DataError
from lm.data.files import Examples, bundled_path, expand_paths, read_labeled_files, read_text
from lm.data.packing import (
    LMExamples,
    pack_rows,
    packed_batch,
    packed_eval_batches,
    packed_train_batch,
)
from lm.data.sft import (
    Conversation,
    PackedSplit,
    load_sft,
    read_conversations,
    tokenize_conversations,
)
from lm.data.text_lm import (
    CharText,
    CharTokenizer,
    char_eval_batches,
    char_train_batch,
    load_char_text,
)
from lm.data.tfds_builder import LabeledTextSource, prepare_local_files, prepare_registry
from lm.data.tokenize import Tokenized, tokenize_examples, tokenizer_fingerprint

__all__ = [
    "CharText",
    "CharTokenizer",
    "ClassificationData",
    "Conversation",
    "DataError",
    "Examples",
    "LMExamples",
    "LabeledTextSource",
    "PackedSplit",
    "Tokenized",
    "bundled_path",
    "char_eval_batches",
    "char_train_batch",
    "classification_batch",
    "classification_eval_batches",
    "classification_train_batch",
    "default_cache_dir",
    "epoch_order",
    "eval_index_batches",
    "expand_paths",
    "length_buckets",
    "load_char_text",
    "load_classification",
    "load_sft",
    "num_train_steps",
    "pack_rows",
    "packed_batch",
    "packed_eval_batches",
    "packed_train_batch",
    "prepare_local_files",
    "prepare_registry",
    "read_conversations",
    "read_labeled_files",
    "read_text",
    "split_microbatches",
    "sst2_files",
    "steps_per_epoch",
    "tokenize_conversations",
    "tokenize_examples",
    "tokenizer_fingerprint",
    "train_indices",
]
