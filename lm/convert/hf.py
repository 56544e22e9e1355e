"""Hugging Face checkpoints <-> (ModelConfig, params). The only module that knows HF names/layouts.

Reads a local HF directory (config.json + model.safetensors, sharded safetensors with an index,
or pytorch_model.bin when torch happens to be installed) for model types bert, gpt2, llama,
mistral and qwen2, and writes one back that ``transformers.AutoModel*.from_pretrained`` loads.

Layouts: torch ``nn.Linear`` stores weight [out, in], our Dense kernel is [in, out], so linear
weights are transposed; GPT-2's ``Conv1D`` already stores [in, out] and fuses q/k/v in
``c_attn`` [D, 3D], which is split here.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from lm.config import ModelConfig

SUPPORTED = ("bert", "gpt2", "llama", "mistral", "qwen2")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match its config; the message names the file."""


# ----------------------------------------------------------------------------------------------
# config.json <-> ModelConfig


def _head_from_architectures(archs: list[str] | None) -> str:
    arch = (archs or [""])[0]
    if arch.endswith("ForSequenceClassification"):
        return "classification"
    if arch.endswith("ForTokenClassification"):
        return "token_classification"
    if arch.endswith(("ForCausalLM", "LMHeadModel", "ForMaskedLM", "ForPreTraining")):
        return "lm"
    return "none"


def _rope(hf: dict) -> tuple[float, tuple | None]:
    # transformers 5 nests RoPE settings in `rope_parameters`; 4.x used rope_theta/rope_scaling.
    params = dict(hf.get("rope_parameters") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = hf.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind in (None, "default"):
        return theta, None
    if kind == "linear":
        return theta, (("type", "linear"), ("factor", float(scaling["factor"])))
    if kind == "llama3":
        return theta, (
            ("type", "llama3"),
            ("factor", float(scaling["factor"])),
            ("low_freq_factor", float(scaling["low_freq_factor"])),
            ("high_freq_factor", float(scaling["high_freq_factor"])),
            ("original_max_len", int(scaling["original_max_position_embeddings"])),
        )
    raise ValueError(f"RoPE scaling {kind!r} is not supported (supported: default, linear, llama3)")


def config_from_hf(hf: dict, source: str = "config.json") -> tuple[ModelConfig, dict]:
    """ModelConfig from an HF config dict; also returns extras (``labels``: id -> name list).

    Raises:
        CheckpointError: unknown model_type or missing fields, naming ``source``.
    """
    mt = hf.get("model_type")
    if mt not in SUPPORTED:
        raise CheckpointError(
            f"{source}: model_type {mt!r} is not supported; supported: {', '.join(SUPPORTED)}"
        )
    head = _head_from_architectures(hf.get("architectures"))
    id2label = hf.get("id2label") or {}
    labels = [id2label[k] for k in sorted(id2label, key=int)] if id2label else None
    num_labels = len(labels) if labels else int(hf.get("num_labels", 2))
    act_names = {
        "gelu": "gelu",
        "gelu_new": "gelu_tanh",
        "gelu_pytorch_tanh": "gelu_tanh",
        "silu": "silu",
        "swish": "silu",
        "relu": "relu",
    }
    try:
        if mt == "bert":
            d, n = hf["hidden_size"], hf["num_attention_heads"]
            act = hf.get("hidden_act", "gelu")
            kw = dict(
                family="bert",
                causal=False,
                norm="layernorm",
                norm_eps=hf.get("layer_norm_eps", 1e-12),
                pre_norm=False,
                embed_norm=True,
                final_norm=False,
                mlp="plain",
                activation=act_names[act],
                positions="learned",
                type_vocab_size=hf.get("type_vocab_size", 2),
                qkv_bias=True,
                out_bias=True,
                mlp_bias=True,
                vocab_size=hf["vocab_size"],
                d_model=d,
                num_heads=n,
                num_kv_heads=n,
                head_dim=d // n,
                num_layers=hf["num_hidden_layers"],
                mlp_dim=hf["intermediate_size"],
                max_len=hf.get("max_position_embeddings", 512),
                pooler=head in ("none", "classification"),
                pad_token_id=hf.get("pad_token_id") or 0,
                dropout_rate=hf.get("hidden_dropout_prob", 0.1),
                attn_dropout_rate=hf.get("attention_probs_dropout_prob", 0.1),
                head="lm" if head == "lm" else head,
                tie_embeddings=True,
            )
            if head == "lm":
                raise CheckpointError(f"{source}: BERT masked-LM heads are not supported")
        elif mt == "gpt2":
            d, n = hf["n_embd"], hf["n_head"]
            act = hf.get("activation_function", "gelu_new")
            kw = dict(
                family="gpt2",
                causal=True,
                norm="layernorm",
                norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                mlp="plain",
                activation=act_names[act],
                positions="learned",
                qkv_bias=True,
                out_bias=True,
                mlp_bias=True,
                tie_embeddings=True,
                vocab_size=hf["vocab_size"],
                d_model=d,
                num_heads=n,
                num_kv_heads=n,
                head_dim=d // n,
                num_layers=hf["n_layer"],
                mlp_dim=hf.get("n_inner") or 4 * d,
                max_len=hf.get("n_positions", 1024),
                dropout_rate=hf.get("resid_pdrop", 0.1),
                attn_dropout_rate=0.0,
                pad_token_id=hf.get("pad_token_id") or 0,
                head="lm" if head == "none" else head,
                classifier_bias=False,
            )
        else:  # llama, mistral, qwen2
            d, n = hf["hidden_size"], hf["num_attention_heads"]
            theta, scaling = _rope(hf)
            act = hf.get("hidden_act", "silu")
            if act_names.get(act) != "silu":
                raise CheckpointError(f"{source}: hidden_act {act!r} is not supported for {mt}")
            qkv_bias = mt == "qwen2" or bool(hf.get("attention_bias", False))
            kw = dict(
                family=mt,
                causal=True,
                norm="rmsnorm",
                norm_eps=hf.get("rms_norm_eps", 1e-6),
                mlp="gated",
                activation="silu",
                positions="rope",
                rope_theta=theta,
                rope_scaling=scaling,
                qkv_bias=qkv_bias,
                out_bias=mt != "qwen2" and bool(hf.get("attention_bias", False)),
                mlp_bias=bool(hf.get("mlp_bias", False)),
                tie_embeddings=bool(hf.get("tie_word_embeddings", mt != "llama")),
                vocab_size=hf["vocab_size"],
                d_model=d,
                num_heads=n,
                num_kv_heads=hf.get("num_key_value_heads") or n,
                head_dim=hf.get("head_dim") or d // n,
                num_layers=hf["num_hidden_layers"],
                mlp_dim=hf["intermediate_size"],
                max_len=hf.get("max_position_embeddings", 2048),
                dropout_rate=0.0,
                attn_dropout_rate=float(hf.get("attention_dropout", 0.0)),
                pad_token_id=_first_int(hf.get("pad_token_id"), hf.get("eos_token_id"), 0),
                head="lm" if head == "none" else head,
                classifier_bias=False,
            )
    except KeyError as e:
        raise CheckpointError(f"{source}: missing field {e.args[0]!r} for model_type {mt!r}") from e
    kw["num_labels"] = num_labels
    window = hf.get("sliding_window") if mt in ("mistral", "qwen2") else None
    if window and hf.get("use_sliding_window", mt == "mistral") and window < kw["max_len"]:
        # lm implements full attention: identical up to `window` tokens, different beyond.
        print(
            f"warning: {source}: sliding_window={window} is not implemented; attention is full, "
            f"which matches the checkpoint only for sequences of at most {window} tokens",
            file=sys.stderr,
        )
    return ModelConfig(**kw), {"labels": labels}


def _first_int(*vals) -> int:
    for v in vals:
        if isinstance(v, list) and v:
            v = v[0]
        if isinstance(v, int):
            return v
    return 0


def config_to_hf(cfg: ModelConfig, labels: list[str] | None = None) -> dict:
    """HF config.json dict for ``cfg`` (the inverse of ``config_from_hf``)."""
    suffix = {
        "lm": "ForCausalLM",
        "classification": "ForSequenceClassification",
        "token_classification": "ForTokenClassification",
        "none": "Model",
    }[cfg.head]
    labels = labels or [f"LABEL_{i}" for i in range(cfg.num_labels)]
    common: dict[str, Any] = {"vocab_size": cfg.vocab_size, "torch_dtype": "float32"}
    if cfg.head in ("classification", "token_classification"):
        common["id2label"] = {str(i): str(lab) for i, lab in enumerate(labels)}
        common["label2id"] = {str(lab): i for i, lab in enumerate(labels)}
    inv_act = {"gelu": "gelu", "gelu_tanh": "gelu_new", "silu": "silu", "relu": "relu"}
    if cfg.family == "bert":
        return {
            **common,
            "model_type": "bert",
            "architectures": [f"Bert{suffix}"],
            "hidden_size": cfg.d_model,
            "num_attention_heads": cfg.num_heads,
            "num_hidden_layers": cfg.num_layers,
            "intermediate_size": cfg.mlp_dim,
            "max_position_embeddings": cfg.max_len,
            "type_vocab_size": cfg.type_vocab_size,
            "layer_norm_eps": cfg.norm_eps,
            "hidden_act": inv_act[cfg.activation],
            "pad_token_id": cfg.pad_token_id,
            "hidden_dropout_prob": cfg.dropout_rate,
            "attention_probs_dropout_prob": cfg.attn_dropout_rate,
        }
    if cfg.family == "gpt2":
        arch = "GPT2LMHeadModel" if cfg.head == "lm" else f"GPT2{suffix}"
        return {
            **common,
            "model_type": "gpt2",
            "architectures": [arch],
            "n_embd": cfg.d_model,
            "n_head": cfg.num_heads,
            "n_layer": cfg.num_layers,
            "n_inner": cfg.mlp_dim,
            "n_positions": cfg.max_len,
            "layer_norm_epsilon": cfg.norm_eps,
            "activation_function": inv_act[cfg.activation],
            "resid_pdrop": cfg.dropout_rate,
            "embd_pdrop": cfg.dropout_rate,
            "attn_pdrop": cfg.attn_dropout_rate,
            "pad_token_id": cfg.pad_token_id,
            "tie_word_embeddings": True,
        }
    prefix = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[cfg.family]
    out = {
        **common,
        "model_type": cfg.family,
        "architectures": [f"{prefix}{suffix}"],
        "hidden_size": cfg.d_model,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "num_hidden_layers": cfg.num_layers,
        "intermediate_size": cfg.mlp_dim,
        "max_position_embeddings": cfg.max_len,
        "rms_norm_eps": cfg.norm_eps,
        "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_embeddings,
        "pad_token_id": cfg.pad_token_id,
        "rope_theta": cfg.rope_theta,
    }
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    sc = cfg.rope_scaling_dict
    if sc and sc["type"] == "linear":
        rope = {"rope_type": "linear", "factor": sc["factor"], "rope_theta": cfg.rope_theta}
    elif sc:
        rope = {
            "rope_type": "llama3",
            "factor": sc["factor"],
            "rope_theta": cfg.rope_theta,
            "low_freq_factor": sc["low_freq_factor"],
            "high_freq_factor": sc["high_freq_factor"],
            "original_max_position_embeddings": sc["original_max_len"],
        }
    out["rope_parameters"] = rope
    if cfg.family == "llama":
        out["attention_bias"] = cfg.qkv_bias
        out["mlp_bias"] = cfg.mlp_bias
    if cfg.family == "mistral":
        out["sliding_window"] = None
    return out


# ----------------------------------------------------------------------------------------------
# parameter names


@dataclass(frozen=True)
class Entry:
    """One HF tensor and where it goes: ``path`` in our tree; ``kind`` says how to reshape."""

    path: tuple[str, ...]
    hf: str
    kind: str  # "linear" (transpose), "copy" (as is), "qkv:i" (GPT-2 fused c_attn, part i)


def _entries(cfg: ModelConfig) -> Iterator[Entry]:
    """Every parameter of ``cfg`` with its HF name (without the base-model prefix)."""
    L = "linear"
    if cfg.family == "bert":
        yield Entry(("embed", "embedding"), "embeddings.word_embeddings.weight", "copy")
        yield Entry(("pos_embed", "embedding"), "embeddings.position_embeddings.weight", "copy")
        yield Entry(("type_embed", "embedding"), "embeddings.token_type_embeddings.weight", "copy")
        yield Entry(("embed_norm", "scale"), "embeddings.LayerNorm.weight", "copy")
        yield Entry(("embed_norm", "bias"), "embeddings.LayerNorm.bias", "copy")
        for i in range(cfg.num_layers):
            p, h = f"layers_{i}", f"encoder.layer.{i}."
            names = {
                ("attn", "q"): "attention.self.query",
                ("attn", "k"): "attention.self.key",
                ("attn", "v"): "attention.self.value",
                ("attn", "o"): "attention.output.dense",
                ("mlp", "up"): "intermediate.dense",
                ("mlp", "down"): "output.dense",
            }
            for (a, b), n in names.items():
                yield Entry((p, a, b, "kernel"), h + n + ".weight", L)
                yield Entry((p, a, b, "bias"), h + n + ".bias", "copy")
            for ours, n in (
                ("attn_norm", "attention.output.LayerNorm"),
                ("mlp_norm", "output.LayerNorm"),
            ):
                yield Entry((p, ours, "scale"), h + n + ".weight", "copy")
                yield Entry((p, ours, "bias"), h + n + ".bias", "copy")
        if cfg.pooler:
            yield Entry(("pooler", "kernel"), "pooler.dense.weight", L)
            yield Entry(("pooler", "bias"), "pooler.dense.bias", "copy")
    elif cfg.family == "gpt2":
        yield Entry(("embed", "embedding"), "wte.weight", "copy")
        yield Entry(("pos_embed", "embedding"), "wpe.weight", "copy")
        for i in range(cfg.num_layers):
            p, h = f"layers_{i}", f"h.{i}."
            for j, qkv in enumerate("qkv"):
                yield Entry((p, "attn", qkv, "kernel"), h + "attn.c_attn.weight", f"qkv:{j}")
                yield Entry((p, "attn", qkv, "bias"), h + "attn.c_attn.bias", f"qkv:{j}")
            for ours, n in (
                (("attn", "o"), "attn.c_proj"),
                (("mlp", "up"), "mlp.c_fc"),
                (("mlp", "down"), "mlp.c_proj"),
            ):
                yield Entry((p, *ours, "kernel"), h + n + ".weight", "copy")
                yield Entry((p, *ours, "bias"), h + n + ".bias", "copy")
            for ours, n in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
                yield Entry((p, ours, "scale"), h + n + ".weight", "copy")
                yield Entry((p, ours, "bias"), h + n + ".bias", "copy")
        yield Entry(("final_norm", "scale"), "ln_f.weight", "copy")
        yield Entry(("final_norm", "bias"), "ln_f.bias", "copy")
    else:
        yield Entry(("embed", "embedding"), "embed_tokens.weight", "copy")
        for i in range(cfg.num_layers):
            p, h = f"layers_{i}", f"layers.{i}."
            for x in "qkvo":
                yield Entry((p, "attn", x, "kernel"), h + f"self_attn.{x}_proj.weight", L)
                bias = cfg.qkv_bias if x != "o" else cfg.out_bias
                if bias:
                    yield Entry((p, "attn", x, "bias"), h + f"self_attn.{x}_proj.bias", "copy")
            for x in ("gate", "up", "down"):
                yield Entry((p, "mlp", x, "kernel"), h + f"mlp.{x}_proj.weight", L)
                if cfg.mlp_bias:
                    yield Entry((p, "mlp", x, "bias"), h + f"mlp.{x}_proj.bias", "copy")
            yield Entry((p, "attn_norm", "scale"), h + "input_layernorm.weight", "copy")
            yield Entry((p, "mlp_norm", "scale"), h + "post_attention_layernorm.weight", "copy")
        yield Entry(("final_norm", "scale"), "norm.weight", "copy")


def _head_entries(cfg: ModelConfig) -> Iterator[Entry]:
    """Head tensors; their HF names carry no base-model prefix."""
    if cfg.head == "lm" and not cfg.tie_embeddings:
        yield Entry(("lm_head", "kernel"), "lm_head.weight", "linear")
    if cfg.head in ("classification", "token_classification"):
        name = "classifier" if cfg.family == "bert" else "score"
        yield Entry(("classifier", "kernel"), f"{name}.weight", "linear")
        if cfg.classifier_bias:
            yield Entry(("classifier", "bias"), f"{name}.bias", "copy")


def _base_prefix(cfg: ModelConfig) -> str:
    return {"bert": "bert.", "gpt2": "transformer."}.get(cfg.family, "model.")


# ----------------------------------------------------------------------------------------------
# reading tensors


class TensorFiles:
    """Lazy name -> tensor access over one or more safetensors files (or a torch .bin)."""

    def __init__(self, directory: str):
        self.directory = directory
        self._index: dict[str, str] = {}
        self._handles: dict[str, Any] = {}
        single = os.path.join(directory, "model.safetensors")
        index = os.path.join(directory, "model.safetensors.index.json")
        bin_file = os.path.join(directory, "pytorch_model.bin")
        if os.path.exists(single):
            self._open_safetensors(single)
        elif os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise CheckpointError(f"{index}: not a readable safetensors index ({e})") from e
            for shard in sorted(set(weight_map.values())):
                path = os.path.join(directory, shard)
                if not os.path.exists(path):
                    raise CheckpointError(f"{index}: names shard {shard!r}, which is missing")
                self._open_safetensors(path)
        elif os.path.exists(bin_file):
            self._load_torch_bin(bin_file)
        else:
            raise CheckpointError(
                f"{directory}: no weights found (looked for model.safetensors, "
                "model.safetensors.index.json, pytorch_model.bin)"
            )

    def _open_safetensors(self, path: str):
        from safetensors import SafetensorError, safe_open

        # Read the header ourselves first: a truncated file has a valid header but short data,
        # and saying "truncated" is more useful than a deserialization error.
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if n <= 0 or n > size:
                    raise ValueError(f"header length {n} does not fit in {size} bytes")
                header = json.loads(f.read(n))
            end = max(
                (v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0
            )
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from e
        if 8 + n + end > size:
            raise CheckpointError(
                f"{path}: truncated safetensors file ({size} bytes, header promises {8 + n + end})"
            )
        try:
            handle = safe_open(path, framework="numpy")
            keys = list(handle.keys())
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from e
        self._handles[path] = handle
        self._headers = getattr(self, "_headers", {})
        self._headers.update({k: (path, header[k]) for k in keys})
        for k in keys:
            self._index[k] = path

    def _load_torch_bin(self, path: str):
        try:
            import torch
        except ImportError as e:
            raise CheckpointError(
                f"{path}: pytorch_model.bin needs torch to read; convert it to safetensors "
                "or install torch"
            ) from e
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many kinds
            raise CheckpointError(f"{path}: unreadable torch checkpoint ({e})") from e
        self._tensors = {k: v.float().numpy() for k, v in state.items()}
        self._headers = {k: (path, {"shape": list(v.shape)}) for k, v in self._tensors.items()}
        for k in self._tensors:
            self._index[k] = path

    def keys(self):
        return self._index.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._headers[name][1]["shape"])

    def file_of(self, name: str) -> str:
        return self._index[name]

    def get(self, name: str) -> np.ndarray:
        if hasattr(self, "_tensors"):
            return self._tensors[name]
        path = self._index[name]
        dtype = self._headers[name][1].get("dtype")
        if dtype == "BF16":
            return _read_bf16(path, self._headers[name][1])
        return self._handles[path].get_tensor(name)


def _read_bf16(path: str, info: dict) -> np.ndarray:
    # safetensors' numpy reader has no bfloat16; read the raw bytes through ml_dtypes.
    import ml_dtypes

    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        start, end = info["data_offsets"]
        f.seek(8 + n + start)
        raw = f.read(end - start)
    return np.frombuffer(raw, dtype=ml_dtypes.bfloat16).reshape(info["shape"])


# ----------------------------------------------------------------------------------------------
# import / export


def _expected_shape(cfg: ModelConfig, e: Entry, ours: tuple[int, ...]) -> tuple[int, ...]:
    if e.kind == "linear":
        return tuple(reversed(ours))
    if e.kind.startswith("qkv"):
        return (ours[0], 3 * ours[1]) if len(ours) == 2 else (3 * ours[0],)
    return ours


def load_hf_dir(
    directory: str, head: str | None = None, num_labels: int | None = None, dtype: str | None = None
) -> tuple[ModelConfig, dict, dict]:
    """Read an HF checkpoint directory into ``(ModelConfig, params, extras)``.

    Args:
        directory: holds config.json and weights.
        head: override the head implied by ``architectures`` (e.g. "classification" to put a
            fresh classifier on a base model; its parameters are then randomly initialized).
        num_labels: classifier size when ``head`` adds a fresh classifier.
        dtype: parameter dtype of the result (default: float32).

    Returns:
        cfg, params (numpy arrays, our layout), extras (``labels``, ``missing_head``: True when
        the head was not in the checkpoint and was initialized randomly).

    Raises:
        CheckpointError: missing/unreadable files, unknown model type, or tensors whose shapes
            disagree with config.json, all checked before any parameter is built.
    """
    cfg_path = os.path.join(directory, "config.json")
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: not a directory")
    if not os.path.exists(cfg_path):
        raise CheckpointError(f"{directory}: no config.json (not an HF checkpoint directory)")
    try:
        with open(cfg_path) as f:
            hf = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: unreadable ({e})") from e
    cfg, extras = config_from_hf(hf, cfg_path)
    if head is not None and head != cfg.head:
        cfg = cfg.replace(
            head=head, pooler=cfg.family == "bert" and head in ("none", "classification")
        )
    if num_labels is not None:
        cfg = cfg.replace(num_labels=num_labels)
    if dtype:
        cfg = cfg.replace(param_dtype=dtype)
    files = TensorFiles(directory)
    params, missing_head = build_params(cfg, files, directory)
    extras["missing_head"] = missing_head
    return cfg, params, extras


def build_params(cfg: ModelConfig, files, source: str) -> tuple[dict, bool]:
    """Our params from HF-named tensors (``files``: keys/shape/get/file_of), shapes checked first.

    Returns:
        params (numpy, ``cfg.param_dtype``) and whether the head was missing (then initialized
        randomly, as when a classifier is put on a base model).
    """
    import jax

    from lm.model import init_params, param_shapes

    names = set(files.keys())

    # HF prefixes the base model ("bert.", "transformer.", "model.") inside task models only.
    prefix = _base_prefix(cfg)
    base_has_prefix = any(k.startswith(prefix) for k in names)
    shapes = param_shapes(cfg)
    problems, plan = [], []
    missing_head = False
    for e, is_head in [(e, False) for e in _entries(cfg)] + [(e, True) for e in _head_entries(cfg)]:
        name = e.hf if is_head or not base_has_prefix else prefix + e.hf
        ours = _get(shapes, e.path).shape
        if name not in names:
            if is_head or e.path[0] == "pooler":
                missing_head = True
                continue
            problems.append(f"missing tensor {name!r}")
            continue
        want, got = _expected_shape(cfg, e, ours), files.shape(name)
        if tuple(want) != tuple(got):
            problems.append(
                f"{name} in {os.path.basename(files.file_of(name))}: shape {list(got)}, "
                f"config.json implies {list(want)}"
            )
        plan.append((e, name))
    if problems:
        shown = "; ".join(problems[:8]) + (
            f"; ... {len(problems) - 8} more" if len(problems) > 8 else ""
        )
        raise CheckpointError(f"{source}: weights do not match config.json: {shown}")

    np_dtype = np.dtype(cfg.param_dtype) if cfg.param_dtype != "bfloat16" else None
    params = jax.tree.map(lambda x: None, shapes)
    if missing_head:
        fresh = init_params(cfg, 0)
        params = jax.tree.map(np.asarray, fresh)
    cache: dict[str, np.ndarray] = {}
    for e, name in plan:
        if name not in cache:
            cache = {name: files.get(name).astype(np.float32)}
        t = cache[name]
        if e.kind == "linear":
            t = t.T
        elif e.kind.startswith("qkv"):
            j = int(e.kind.split(":")[1])
            t = np.split(t, 3, axis=-1)[j]
        t = np.ascontiguousarray(t)
        if np_dtype is not None:
            t = t.astype(np_dtype)
        else:
            import ml_dtypes

            t = t.astype(ml_dtypes.bfloat16)
        _set(params, e.path, t)
    return params, missing_head


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree, path, value):
    for p in path[:-1]:
        tree = tree[p]
    tree[path[-1]] = value


def to_hf_state(cfg: ModelConfig, params: dict) -> dict[str, np.ndarray]:
    """Our params -> HF state dict (numpy float32, torch layout, task-model names)."""
    from lm.model import unstack_layers

    params = unstack_layers(cfg, params)
    cfg = cfg.replace(scan_layers=False)
    prefix = _base_prefix(cfg) if cfg.head != "none" else ""
    if cfg.family == "gpt2" and cfg.head == "lm":
        prefix = "transformer."
    state: dict[str, np.ndarray] = {}
    qkv: dict[str, list] = {}
    for e in _entries(cfg):
        t = np.asarray(_get(params, e.path), dtype=np.float32)
        name = prefix + e.hf
        if e.kind == "linear":
            state[name] = np.ascontiguousarray(t.T)
        elif e.kind.startswith("qkv"):
            qkv.setdefault(name, [None] * 3)[int(e.kind.split(":")[1])] = t
        else:
            state[name] = np.ascontiguousarray(t)
    for name, parts in qkv.items():
        state[name] = np.ascontiguousarray(np.concatenate(parts, axis=-1))
    for e in _head_entries(cfg):
        t = np.asarray(_get(params, e.path), dtype=np.float32)
        state[e.hf] = np.ascontiguousarray(t.T if e.kind == "linear" else t)
    if cfg.head == "lm" and cfg.tie_embeddings and cfg.family != "bert":
        # Tied heads are not stored by transformers; writing them explicitly is also accepted.
        pass
    return state


def save_hf_dir(
    cfg: ModelConfig, params: dict, out_dir: str, tokenizer=None, labels: list[str] | None = None
) -> str:
    """Write ``(cfg, params)`` as an HF checkpoint directory (config.json, model.safetensors,
    tokenizer files when a tokenizer is given). Returns ``out_dir``."""
    from safetensors.numpy import save_file

    if cfg.lora_rank:
        raise ValueError("merge LoRA adapters before export (lm.lora.merge)")
    os.makedirs(out_dir, exist_ok=True)
    hf = config_to_hf(cfg, labels)
    special = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, key, None) if tokenizer is not None else None
        if isinstance(value, int):
            special[key] = value
    hf.update(special)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    if cfg.causal and special:
        # generate() reads its stopping token from here.
        with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
            json.dump(special, f, indent=2)
    save_file(
        to_hf_state(cfg, params),
        os.path.join(out_dir, "model.safetensors"),
        metadata={"format": "pt"},
    )
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir
