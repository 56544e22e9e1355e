"""Every config file loads, validates and resolves (and its :smoke variant); each docstring
holds its launch command."""

import glob
import os

import pytest

from lm import experiment
from lm.pretrained import resolve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


def _is_experiment(config) -> bool:
    return all(k in config for k in ("task", "model", "data", "train", "optim"))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_loads_validates_and_resolves(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("cfg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert "python scripts/" in (module.__doc__ or ""), f"{path}: docstring lacks its command"
    config = module.get_config()
    if not _is_experiment(config):
        return  # e.g. configs/decode.py: its own script checks it
    experiment.validate(config)
    variants = [config]
    if ":smoke" in module.__doc__:
        smoke = experiment.load_config_file(path + ":smoke")
        experiment.validate(smoke)
        variants.append(smoke)
    for c in variants:
        name = c.model.name
        if experiment.is_preset(name):
            from lm.config import preset

            cfg = experiment.model_config(c, preset(name))
            assert cfg.head in ("lm", "classification", "token_classification")
        else:
            assert os.path.exists(resolve(name)), name
        if c.task == "classification" and c.data.name == "sst2":
            kw = experiment.data_kwargs(c)
            assert os.path.exists(kw["train_files"]) and os.path.exists(kw["eval_files"])
        assert c.train.batch_size % c.optim.grad_accum == 0
        assert experiment.buckets(c)[-1] == c.data.max_len


def test_model_config_is_the_one_conversion():
    from lm.config import preset

    c = experiment.base_config()
    c.model.dropout_rate = 0.2
    c.model.dtype = "bfloat16"
    c.model.num_labels = 5
    cfg = experiment.model_config(c, preset("tiny-bert"))
    assert (cfg.dropout_rate, cfg.dtype, cfg.num_labels, cfg.head) == (
        0.2,
        "bfloat16",
        5,
        "classification",
    )
    c.model.dtype = "auto"
    assert experiment.model_config(c, preset("tiny-bert")).dtype in ("float32", "bfloat16")
