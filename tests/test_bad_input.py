"""Bad input and failures that must cost seconds and lose nothing (issue 6): over-long inputs,
a disk that fills up during a checkpoint write, and the debugging switches."""

import errno
import os

import pytest
from test_finetune import files, tiny_config, write_tsv  # noqa: F401 - fixture re-export

from lm import data as lmdata
from lm.train import TrainingError, run


def test_too_long_examples_warn_and_truncate_or_refuse(tmp_path, capsys):
    long_row = ["good " * 40 + "film\tpos"]
    train = write_tsv(tmp_path / "train.tsv", 64, 0, extra_rows=long_row)
    dev = write_tsv(tmp_path / "dev.tsv", 16, 1)
    cfg = tiny_config(train, dev, tmp_path, **{"train.num_steps": 2, "train.eval_every": 0})
    cfg.data.too_long = "error"
    with pytest.raises(
        lmdata.DataError, match=r"1 of 65 train examples are longer than data.max_len=16"
    ):
        run(cfg, str(tmp_path / "refuse"))
    cfg.data.too_long = "truncate"
    out = run(cfg, str(tmp_path / "truncate"))
    assert out["step"] == 2
    assert "1 of 65 train examples are longer than data.max_len=16 tokens; they are truncated" in (
        capsys.readouterr().err
    )


def test_disk_full_during_checkpoint_write_keeps_previous_checkpoint(files, tmp_path, monkeypatch):  # noqa: F811
    from orbax.checkpoint._src.path import atomicity

    train, dev = files
    cfg = tiny_config(train, dev, tmp_path, **{"train.num_steps": 12, "train.eval_every": 0})
    real = atomicity.AtomicRenameTemporaryPath.finalize

    async def full_disk(self):
        if os.path.basename(str(self._final_path)) == "8":
            raise OSError(errno.ENOSPC, "No space left on device", str(self._tmp_path))
        return await real(self)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", full_disk)
    wd = str(tmp_path / "run")
    with pytest.raises(
        TrainingError,
        match=r"checkpoint write failed.*No space left on device.*last complete checkpoint is step 4",
    ):
        run(cfg, wd)
    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", real)
    from lm.checkpoint import Checkpointer

    ckpt = Checkpointer(os.path.join(wd, "checkpoints"))
    assert ckpt.latest_step() == 4
    state, _ = ckpt.restore(4)  # intact and readable
    ckpt.close()
    assert run(cfg, wd)["step"] == 12  # space is back: the relaunch resumes from step 4


def test_debug_nans_and_profile_switches(files, tmp_path):  # noqa: F811
    train, dev = files
    cfg = tiny_config(train, dev, tmp_path, **{"train.num_steps": 4, "train.eval_every": 0})
    cfg.debug.nans = True
    cfg.debug.profile_steps = 2
    cfg.debug.profile_start = 1
    wd = str(tmp_path / "run")
    assert run(cfg, wd)["step"] == 4
    traces = [f for _, _, fs in os.walk(os.path.join(wd, "profile")) for f in fs]
    assert any(f.endswith(".xplane.pb") for f in traces), traces
    import jax

    jax.config.update("jax_debug_nans", False)
