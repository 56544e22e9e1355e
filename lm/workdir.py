"""A causal-LM training run from its workdir, for decoding and export.

    m = load_workdir("runs/shakespeare")        # lm.pretrained.Pretrained: cfg, params, tokenizer
    export_workdir("runs/sft_lora", "hf_dir")   # merged LoRA -> transformers-loadable directory

The workdir holds ``config.json`` (the experiment), ``model.json`` (the ModelConfig),
``tokenizer/`` (an HF tokenizer, or ``char_vocab.json`` for a character model, read by
``lm.causal.CharTokenizer``) and ``checkpoints/``. A LoRA run's checkpoints hold the adapters
only: the frozen base is loaded again from ``config.model.name`` and the adapters are merged
into it (``lm.lora.merge``), so what comes back is an ordinary LoRA-free model.
"""

from __future__ import annotations

import os

import jax

from lm.convert.hf import CheckpointError


def load_workdir(path: str, step: int | None = None, dtype: str | None = None):
    """The model of a causal-LM run (checkpoint ``step``, default the best), LoRA merged.

    Args:
        path: the run directory written by scripts/finetune.py.
        step: a checkpoint step; default the best by the run's early-stopping metric (the
            latest when there was no evaluation).
        dtype: unused here (``lm.decode.prepare`` casts); kept for ``lm.decode``'s hook.

    Returns:
        ``lm.pretrained.Pretrained`` with ``path=""`` (the workdir's config.json is no HF
        config).

    Raises:
        CheckpointError: not a causal-LM run, or no complete checkpoint yet.
    """
    del dtype
    from lm import lora
    from lm.causal import load_tokenizer
    from lm.checkpoint import Checkpointer
    from lm.classify import WorkdirNotReady, model_config_from_dict, read_run
    from lm.model import param_shapes
    from lm.pretrained import Pretrained
    from lm.train import early_stop_metric

    try:
        config, info = read_run(path)
    except WorkdirNotReady as e:
        raise CheckpointError(str(e)) from e
    if info.get("task") != "causal_lm":
        raise CheckpointError(
            f"{path}: a {info.get('task')!r} run, not a causal LM; use scripts/predict.py"
        )
    cfg = model_config_from_dict(info["model_config"])
    tokenizer = load_tokenizer(os.path.join(path, "tokenizer"))
    shapes = param_shapes(cfg)
    if cfg.lora_rank:
        shapes = lora.adapters_and_base(shapes)[0]
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), shapes)
    ckpt = Checkpointer(
        os.path.join(path, "checkpoints"), keep=10**6, best_metric=early_stop_metric(config)
    )
    try:
        step = ckpt.best_step() if step is None else step
        if step is None or step not in ckpt.all_steps():
            raise CheckpointError(
                f"{path}: no complete checkpoint{'' if step is None else f' at step {step}'} "
                f"(have {ckpt.all_steps()})"
            )
        params, step = ckpt.restore_params(step, abstract)
    finally:
        ckpt.close()
    if cfg.lora_rank:
        # The frozen base as the run started from it: the checkpoint, or a preset's seeded init.
        import copy

        from lm.experiment import is_preset, load_model

        config = copy.deepcopy(config)
        if is_preset(config.model.name):
            config.model.vocab_size = cfg.vocab_size
        base = lora.adapters_and_base(load_model(config).params)[1]
        cfg, params = lora.merge(cfg, lora.combine(jax.device_get(params), base))
    return Pretrained(cfg, jax.device_get(params), tokenizer, None, "", False)


def export_workdir(path: str, out_dir: str, step: int | None = None) -> tuple[str, object]:
    """A causal-LM run as an HF directory (float32, LoRA merged, tokenizer saved beside it;
    ``transformers.AutoModelForCausalLM`` loads it). Returns ``(out_dir, Pretrained)``."""
    from lm.convert.hf import save_hf_dir

    m = load_workdir(path, step)
    return save_hf_dir(m.cfg, m.params, out_dir, m.tokenizer), m


def is_causal_run(path: str) -> bool:
    """True for a workdir whose model.json says ``task: causal_lm``."""
    import json

    try:
        with open(os.path.join(path, "model.json")) as f:
            return json.load(f).get("task") == "causal_lm"
    except (OSError, ValueError):
        return False
