"""lm.metrics.MetricWriter: metrics.jsonl and TensorBoard scalars, written without PyTorch."""

import glob
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# In a fresh process (torch not imported): write two steps, then report whether torch got
# imported on the way and whether it still imports afterwards.
PROBE = """
import sys
from lm.metrics import MetricWriter
w = MetricWriter(sys.argv[1])
w.write(1, {"train/loss": 2.5, "lr": 1e-3})
w.write(2, {"train/loss": 2.25, "note": "text is skipped"})
w.close()
print("torch" in sys.modules)
try:
    import torch  # noqa: F401
    print("importable")
except ImportError:
    print("absent")
"""


def test_metrics_reach_jsonl_and_tensorboard_without_importing_torch(tmp_path):
    from tensorboardX.proto import event_pb2

    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path)],
        env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert out[0] == "False"  # tensorboardX did not pull torch in
    # and torch still imports afterwards where it is installed (the test environment has it)
    installed = importlib.util.find_spec("torch") is not None
    assert out[1] == ("importable" if installed else "absent")
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["train/loss"] == 2.25

    # The event file, read record by record (TFRecord framing: length, crc, data, crc).
    (path,) = glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    data, scalars = open(path, "rb").read(), {}
    while data:
        n = int.from_bytes(data[:8], "little")
        event = event_pb2.Event.FromString(data[12 : 12 + n])
        data = data[16 + n :]
        for v in event.summary.value:
            scalars[(event.step, v.tag)] = v.simple_value
    assert scalars == {
        (1, "train/loss"): 2.5,
        (1, "lr"): pytest.approx(1e-3),
        (2, "train/loss"): 2.25,
    }
