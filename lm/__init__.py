"""lm: fine-tune and run pretrained transformer language models in JAX/Flax.

import lm
m = lm.load("minilm-l6")                       # BERT, GPT-2, Llama-family; HF dir or GGUF
batch = m.tokenizer(["a fine film"], return_tensors="np")
out = lm.forward(m.cfg, m.params, batch["input_ids"], mask=batch["attention_mask"])
"""

from lm.config import PRESETS, ModelConfig, preset
from lm.convert.hf import CheckpointError, save_hf_dir
from lm.model import Transformer, forward, init_cache, init_params, param_shapes
from lm.pretrained import Pretrained, load, resolve

__all__ = [
    "PRESETS",
    "CheckpointError",
    "ModelConfig",
    "Pretrained",
    "Transformer",
    "forward",
    "init_cache",
    "init_params",
    "load",
    "param_shapes",
    "preset",
    "resolve",
    "save_hf_dir",
]
