"""A GGUF file's metadata as Python values and its tensors as views of the mapped file.

Why not ``gguf.GGUFReader``: it makes numpy views for every part of every metadata value, and a
Llama-family tokenizer is ~100k strings (49,152 tokens and ~48,900 merges in SmolLM2), so opening
SmolLM2-135M took 5.2 s of a 7.2 s ``lm.load`` on a 2-core Zen 3 host; parsing the same header from
bytes takes ~0.2 s. Dequantizing stays with the ``gguf`` package (``gguf.dequantize``).

The layout (GGUF v2 and v3, little-endian; llama.cpp ``docs/gguf.md``):

    magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv x (key: string, value type: u32, value)           string = u64 length + UTF-8 bytes
    n_tensors x (name: string, n_dims: u32, dims: n_dims x u64 (fastest first), type: u32,
                 offset: u64 from the data section)
    padding to ``general.alignment`` (default 32) | the data section
"""

from __future__ import annotations

import dataclasses
import struct

import numpy as np

# GGUF value types (gguf.GGUFValueType): scalar struct formats, 8 = string, 9 = array.
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9


class GGUFFormatError(ValueError):
    """The bytes are not a GGUF file this reader understands (the message says where)."""


class GGUFTruncatedError(GGUFFormatError):
    """A well-formed header whose tensor data runs past the end of the file (a cut download)."""


@dataclasses.dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]  # GGUF order: fastest-varying dimension first
    tensor_type: int  # gguf.GGMLQuantizationType value
    data_offset: int  # absolute, in bytes
    n_bytes: int
    _file: np.ndarray = dataclasses.field(repr=False)

    @property
    def data(self) -> np.ndarray:
        """The tensor as ``gguf.dequantize`` takes it: floats in numpy order (slowest first),
        or a quantized type's bytes, one row of blocks per row."""
        from gguf import GGMLQuantizationType as Q
        from gguf.quants import quant_shape_to_byte_shape

        raw = self._file[self.data_offset : self.data_offset + self.n_bytes]
        dims = tuple(reversed(self.shape))
        floats = {Q.F32: np.float32, Q.F16: np.float16, Q.F64: np.float64}
        if self.tensor_type in floats:
            return raw.view(floats[Q(self.tensor_type)]).reshape(dims)
        return raw.reshape(quant_shape_to_byte_shape(dims, Q(self.tensor_type)))


class GGUFFile:
    """``fields``: every metadata key -> its value (str, int, float, bool or a list of them);
    ``tensors``: their names, shapes, types and extents. The file is mapped, not read: tensors
    are read when their ``data`` is used."""

    def __init__(self, path: str):
        self.path = path
        self._file = np.memmap(path, mode="r")
        self._buf = memoryview(self._file)
        self._pos = 0
        try:
            self._parse()
        except (struct.error, UnicodeDecodeError, IndexError, OverflowError, ValueError) as e:
            if isinstance(e, GGUFFormatError):
                raise
            raise GGUFFormatError(f"malformed header at byte {self._pos} ({e})") from e

    def _take(self, fmt: str):
        v = struct.unpack_from(fmt, self._buf, self._pos)[0]
        self._pos += struct.calcsize(fmt)
        return v

    def _string(self) -> str:
        n = self._take("<Q")
        if self._pos + n > len(self._buf):
            raise GGUFFormatError(f"a string of {n} bytes at byte {self._pos} runs past the end")
        s = str(self._buf[self._pos : self._pos + n], "utf-8")
        self._pos += n
        return s

    def _value(self, kind: int):
        if kind in _SCALARS:
            return self._take(_SCALARS[kind])
        if kind == _STRING:
            return self._string()
        if kind != _ARRAY:
            raise GGUFFormatError(f"unknown value type {kind} at byte {self._pos - 4}")
        sub, n = self._take("<I"), self._take("<Q")
        if sub == _STRING:
            return [self._string() for _ in range(n)]
        if sub in _SCALARS:
            dt = np.dtype(_SCALARS[sub].replace("?", "b1"))
            end = self._pos + n * dt.itemsize
            if end > len(self._buf):
                raise GGUFFormatError(
                    f"an array of {n} values at byte {self._pos} runs past the end"
                )
            v = np.frombuffer(self._buf, dt, n, self._pos).tolist()
            self._pos = end
            return v
        return [self._value(sub) for _ in range(n)]  # arrays of arrays

    def _parse(self):
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        if bytes(self._buf[:4]) != b"GGUF":
            raise GGUFFormatError("no GGUF magic at the start of the file")
        self._pos = 4
        version = self._take("<I")
        if version & 0xFFFF == 0:
            raise GGUFFormatError("big-endian GGUF files are not supported")
        if version not in (2, 3):
            raise GGUFFormatError(f"GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_kv = self._take("<Q"), self._take("<Q")
        self.fields: dict = {}
        for _ in range(n_kv):
            key = self._string()
            self.fields[key] = self._value(self._take("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            shape = tuple(self._take("<Q") for _ in range(self._take("<I")))
            infos.append((name, shape, self._take("<I"), self._take("<Q")))
        align = self.fields.get("general.alignment", 32)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise GGUFFormatError(f"general.alignment {align!r} is not a power of two")
        start = -(-self._pos // align) * align
        self.tensors: list[Tensor] = []
        for name, shape, kind, offset in infos:
            try:
                block, size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            except (ValueError, KeyError):
                raise GGUFFormatError(f"tensor {name}: unknown type {kind}") from None
            n_bytes = int(np.prod(shape, dtype=np.int64)) * size // block
            if start + offset + n_bytes > len(self._buf):
                raise GGUFTruncatedError(f"truncated GGUF file (tensor {name} ends past EOF)")
            self.tensors.append(Tensor(name, shape, kind, start + offset, n_bytes, self._file))
