"""Test setup: 8 fake CPU devices and quick compiles (set before jax is imported), one temporary
folder and one persistent compilation cache for the session, the repo root on sys.path, and
the transformers reference SmolLM2 read once per session."""

import atexit
import contextlib
import fcntl
import os
import shutil
import sys
import tempfile

# The in-process tests compile hundreds of small programs and run each a few times, so LLVM's
# optimization of the generated code costs more than it saves: at level 0 test_model.py took
# 90 s of CPU against 122 s (test_decode.py 56 against 79). XLA's own passes (fusion, layout,
# the order of every reduction) are unchanged; the scripts that tests launch drop XLA_FLAGS
# (one_device_env) and compile as users do.
for _flag in ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0"):
    if _flag not in os.environ.get("XLA_FLAGS", ""):  # pytest-xdist workers inherit it
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# One temporary folder per test session, shared by the pytest-xdist workers and the scripts that
# tests launch (they inherit the variable); removed at the end by the process that made it.
if "LM_TESTS_TMP" not in os.environ:
    os.environ["LM_TESTS_TMP"] = tempfile.mkdtemp(prefix="lm-tests-")
    atexit.register(shutil.rmtree, os.environ["LM_TESTS_TMP"], ignore_errors=True)
SESSION_TMP = os.environ["LM_TESTS_TMP"]

# Why: many tests compile the same programs again (the tiny presets' train and eval steps, in
# this process and in every script a test launches: the kill -9 test relaunches its run five
# times). jax's persistent cache keys an executable by its program, devices and flags, so a
# hit returns what the compiler would have built. Set before jax is imported.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(SESSION_TMP, "jax-cache"))


@contextlib.contextmanager
def session_lock(name: str):
    """An exclusive lock across this session's processes (pytest-xdist workers)."""
    with open(os.path.join(SESSION_TMP, f"{name}.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def transformers_smollm2():
    """transformers' own float32 SmolLM2-135M-Instruct from the GGUF file (its GGUF reader: a
    dequantization and Q/K un-permutation independent of lm's), the reference of the parity
    tests. Reading the GGUF file takes transformers ~25 s (it parses the header twice), so the
    first caller of the session saves the weights it read as safetensors and later callers,
    in any worker, load those (~0.1 s; the same tensors, bit for bit)."""
    import torch
    import transformers
    from safetensors.torch import save_file

    import lm
    from lm.metrics import write_json

    out = os.path.join(SESSION_TMP, "transformers-smollm2")
    with session_lock("transformers-smollm2"):
        if not os.path.exists(os.path.join(out, "config.json")):
            d, f = os.path.split(lm.resolve("smollm2-135m-instruct"))
            hf = transformers.AutoModelForCausalLM.from_pretrained(
                d, gguf_file=f, dtype=torch.float32
            )
            tied = hf.config.tie_word_embeddings  # the head is the embedding: saved once
            sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
            os.makedirs(out, exist_ok=True)
            save_file({k: v for k, v in sd.items() if not (tied and k == "lm_head.weight")},
                      os.path.join(out, "model.safetensors"), metadata={"format": "pt"})  # fmt: skip
            config = hf.config.to_dict()
            config.pop("quantization_config", None)  # the saved weights are plain float32
            write_json(os.path.join(out, "config.json"), config)
    return transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


TORCHLESS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torchless")


def one_device_env() -> dict:
    """The environment of a script that a test launches: this process's without XLA_FLAGS, so
    the script sees one CPU device (the 8 fake ones above make every launch compile and step
    slower on 2 cores), and without torch (``torchless/sitecustomize.py``: lm's scripts must
    not need it; MiniLM's 4-step smoke run took 26.0-30.7 s of wall and 30-35 s of CPU against
    33.2-39.5 s and 38-47 s with transformers importing torch)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (TORCHLESS, env.get("PYTHONPATH")) if p)
    return env
