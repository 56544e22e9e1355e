"""Run at start-up by the scripts that tests launch (``conftest.one_device_env`` puts this
folder first on PYTHONPATH): torch cannot be imported there, as on a machine that runs lm
without it (torch is only the tests' reference, in the test processes). So the launched
scripts prove that they need no torch, and transformers skips the torch imports it makes
whenever torch is installed (``AutoTokenizer`` -> ``configuration_utils`` ->
``modeling_rope_utils``: ~3 s of every launch on the 2-core host)."""

import sys

sys.modules["torch"] = None  # `import torch` raises ImportError; find_spec("torch") is None
