"""Foreign checkpoint formats (HF safetensors directories, GGUF files) <-> lm params."""

from lm.convert.hf import CheckpointError, load_hf_dir, save_hf_dir

__all__ = ["CheckpointError", "load_hf_dir", "save_hf_dir"]
