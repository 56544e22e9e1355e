"""GGUF (llama.cpp) files -> HF-named float tensors and an HF config dict, without torch.

The header is parsed by ``lm.convert.gguf_reader``; tensors are dequantized with the ``gguf``
package. llama.cpp's converter permutes the rows of the Q and K projections so that its RoPE
kernel can rotate adjacent pairs; HF (and lm) rotate halves, so the permutation is undone here
(see llama.cpp ``convert_hf_to_gguf.py``, ``LlamaModel.permute``).
"""

from __future__ import annotations

import functools
import os
import re

import numpy as np

from lm.convert.gguf_reader import GGUFFile, GGUFTruncatedError
from lm.convert.hf import CheckpointError

ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}


def _reader(path: str) -> GGUFFile:
    """A (cached) parsed GGUF file: both the weights and the tokenizer need its metadata."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: GGUF file not found")
    st = os.stat(path)
    return _cached_reader(os.path.abspath(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=2)
def _cached_reader(path: str, mtime_ns: int, size: int) -> GGUFFile:
    try:
        return GGUFFile(path)
    except GGUFTruncatedError as e:
        raise CheckpointError(f"{path}: {e}") from e
    except ValueError as e:  # GGUFFormatError, or numpy cannot map an empty file
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from e


def field(reader: GGUFFile, key: str, default=None):
    return reader.fields.get(key, default)


def hf_config(reader, path: str) -> dict:
    """An HF config.json dict describing the model in the GGUF file."""
    arch = field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(
            f"{path}: GGUF architecture {arch!r} is not supported (supported: {sorted(ARCHITECTURES)})"
        )
    name = (field(reader, "general.name") or "").lower()
    model_type = "mistral" if arch == "llama" and "mistral" in name else ARCHITECTURES[arch]
    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        raise CheckpointError(f"{path}: llama3-style rope_freqs tensors are not supported yet")

    def need(key):
        v = field(reader, f"{arch}.{key}")
        if v is None:
            raise CheckpointError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return v

    d, n = int(need("embedding_length")), int(need("attention.head_count"))
    tokens = field(reader, "tokenizer.ggml.tokens")
    vocab = len(tokens) if tokens is not None else int(need("vocab_size"))
    cfg = {
        "model_type": model_type,
        "architectures": [
            {
                "llama": "LlamaForCausalLM",
                "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM",
            }[model_type]
        ],
        "hidden_size": d,
        "intermediate_size": int(need("feed_forward_length")),
        "num_attention_heads": n,
        "num_key_value_heads": int(field(reader, f"{arch}.attention.head_count_kv", n)),
        "num_hidden_layers": int(need("block_count")),
        "max_position_embeddings": int(need("context_length")),
        "rms_norm_eps": float(field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "hidden_act": "silu",
        "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": field(reader, "tokenizer.ggml.padding_token_id"),
    }
    rope_dim = field(reader, f"{arch}.rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != d // n:
        cfg["head_dim"] = int(rope_dim)
    scaling = field(reader, f"{arch}.rope.scaling.type")
    if scaling and scaling != "none":
        if scaling != "linear":
            raise CheckpointError(f"{path}: RoPE scaling {scaling!r} is not supported")
        cfg["rope_scaling"] = {
            "type": "linear",
            "factor": float(field(reader, f"{arch}.rope.scaling.factor")),
        }
    return cfg


_NAMES = [
    (r"token_embd\.weight", "model.embed_tokens.weight"),
    (r"output_norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.attn_q\.(weight|bias)", r"model.layers.\1.self_attn.q_proj.\2"),
    (r"blk\.(\d+)\.attn_k\.(weight|bias)", r"model.layers.\1.self_attn.k_proj.\2"),
    (r"blk\.(\d+)\.attn_v\.(weight|bias)", r"model.layers.\1.self_attn.v_proj.\2"),
    (r"blk\.(\d+)\.attn_output\.weight", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"blk\.(\d+)\.ffn_gate\.weight", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"blk\.(\d+)\.ffn_up\.weight", r"model.layers.\1.mlp.up_proj.weight"),
    (r"blk\.(\d+)\.ffn_down\.weight", r"model.layers.\1.mlp.down_proj.weight"),
]


def _hf_name(gguf_name: str) -> str | None:
    for pattern, repl in _NAMES:
        if re.fullmatch(pattern, gguf_name):
            return re.sub(pattern, repl, gguf_name)
    return None


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Invert llama.cpp's Q/K row permutation: [heads, H/2, 2, ...] -> [heads, 2, H/2, ...]."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFTensors:
    """HF-named, torch-layout float32 tensors of a GGUF file (same interface as TensorFiles)."""

    def __init__(self, reader, path: str, hf_cfg: dict):
        self.path = path
        self._tensors = {}
        self._heads = {
            "q_proj": hf_cfg["num_attention_heads"],
            "k_proj": hf_cfg["num_key_value_heads"],
        }
        for t in reader.tensors:
            name = _hf_name(t.name)
            if name is not None:
                self._tensors[name] = t

    def keys(self):
        return self._tensors.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        # GGUF lists dimensions fastest-first; torch order is the reverse.
        return tuple(int(x) for x in reversed(self._tensors[name].shape))

    def file_of(self, name: str) -> str:
        return self.path

    def get(self, name: str) -> np.ndarray:
        from gguf import GGMLQuantizationType, dequantize

        t = self._tensors[name]
        try:
            kind = GGMLQuantizationType(t.tensor_type)
            if kind in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                w = np.asarray(t.data, dtype=np.float32)
            else:
                w = dequantize(t.data, kind)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{self.path}: cannot read tensor {t.name} ({e})") from e
        w = np.asarray(w, dtype=np.float32).reshape(self.shape(name))
        for proj, heads in self._heads.items():
            if f"self_attn.{proj}." in name:
                w = _unpermute(w, heads)
        return w


def load_gguf(
    path: str, head: str | None = None, num_labels: int | None = None, dtype: str | None = None
):
    """``(ModelConfig, params, extras)`` from a GGUF file (llama / qwen2 architectures)."""
    from lm.convert.hf import build_params, config_from_hf

    reader = _reader(path)
    hf = hf_config(reader, path)
    cfg, extras = config_from_hf(hf, path)
    if head is not None:
        cfg = cfg.replace(head=head)
    if num_labels is not None:
        cfg = cfg.replace(num_labels=num_labels)
    if dtype:
        cfg = cfg.replace(param_dtype=dtype)
    params, missing_head = build_params(cfg, GGUFTensors(reader, path, hf), path)
    extras["missing_head"] = missing_head
    extras["hf_config"] = hf
    return cfg, params, extras
