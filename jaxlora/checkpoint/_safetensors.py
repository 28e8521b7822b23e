"""The safetensors format as jaxlora reads it: dtype codes, and a file read from its bytes."""

from __future__ import annotations

import json
import struct

import numpy as np

# numpy dtype name -> safetensors code; bfloat16 and the float8 types are ml_dtypes' (a jax dependency)
DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2", "float8_e8m0fnu": "F8_E8M0", "complex64": "C64", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
}  # fmt: skip


def np_dtype(code: str) -> np.dtype:
    """The numpy dtype of a safetensors code that has one (bfloat16 and float8 from ml_dtypes)."""
    import ml_dtypes

    name = {v: k for k, v in DTYPES.items()}[code]
    return np.dtype(getattr(ml_dtypes, name, None) or name)


def load(data: bytes) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """The metadata and the tensors (each its own copy) of a safetensors file, from its bytes.

    Example:
      >>> from safetensors.numpy import save
      >>> meta, tensors = load(save({"w": np.ones((2, 3), np.float32)}, metadata={"format": "pt"}))
      >>> meta, tensors["w"].shape
      ({'format': 'pt'}, (2, 3))
    """
    from safetensors import deserialize

    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
    tensors = {}
    for key, t in deserialize(data):  # safetensors checks the header (offsets, sizes) and copies each tensor
        dtype = np_dtype(t["dtype"])
        stored = dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype  # safetensors is little-endian
        tensors[key] = np.frombuffer(t["data"], stored).astype(dtype, copy=False).reshape(t["shape"])
    return meta, tensors
