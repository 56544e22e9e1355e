"""On-disk caches of prepared data: where they live, how they are keyed, how they are written.

Every cache entry is named by a hash of everything that determines its content, so a stale
entry is never read: change a file, a column, the tokenizer or max_len and the name changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np

# Bump when the layout of a cached file changes, so old entries are not misread.
CACHE_VERSION = 1


def default_cache_dir() -> str:
    """``$LM_DATA_DIR`` if set, else ``~/.cache/lm/data``."""
    return os.environ.get("LM_DATA_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "lm", "data"
    )


def fingerprint(*parts: Any) -> str:
    """A short stable hash (16 hex digits) of JSON-serializable parts."""
    blob = json.dumps([CACHE_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def hash_texts(texts) -> str:
    """sha256 of a sequence of strings (separated so that ['ab','c'] != ['a','bc'])."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()[:16]


def file_stamp(path: str) -> tuple[str, int, int]:
    """(absolute path, mtime in ns, size): cheap identity of a file's content."""
    st = os.stat(path)
    return os.path.abspath(path), st.st_mtime_ns, st.st_size


def save_npz(path: str, arrays: Mapping[str, np.ndarray]) -> None:
    """Writes an .npz atomically: readers see the old file, nothing, or the complete new one."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp.npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_npz(path: str) -> dict[str, np.ndarray] | None:
    """The arrays of a cached .npz, or None if absent or unreadable (then it is rebuilt)."""
    if not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError):
        return None
