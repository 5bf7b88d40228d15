"""Named tensors in a file of the safetensors format, written and read with the standard library.

    save_file({"routes": routes_BSLK.to(torch.int16)}, "routes.safetensors", metadata={...})
    tensors = load_file("routes.safetensors")

The format (huggingface/safetensors): an 8-byte little-endian header length
N, N bytes of JSON ({name: {"dtype", "shape", "data_offsets": [begin, end]}},
plus an optional "__metadata__" of strings), then the tensors' bytes, little
endian, row major, each at its offsets from the end of the header.
`safetensors.torch.load_file` reads what `save_file` writes, and the other
way; the core library needs no package for it (router record and replay:
launch.generate --record-routes).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from torch import Tensor

_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def save_file(tensors: dict[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (any device; copied to the CPU) to `path` in the safetensors format."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    blobs, offset = [], 0
    for name, tensor in tensors.items():
        if tensor.dtype not in _NAMES:
            raise ValueError(
                f"save_file: {name!r} has dtype {tensor.dtype}, not one of {sorted(_NAMES.values())}"
            )
        # NOTE: the bytes as this machine holds them; every platform torch supports is little endian.
        blob = tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {
            "dtype": _NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes, so the data is aligned
    write_whole(path, [struct.pack("<Q", len(text)), text, *blobs])


def write_whole(path: str | Path, chunks: list[bytes]) -> None:
    """Write `chunks` to `path` so that a reader sees the old file or the whole new one, never a part.

    NOTE: into a temporary file in the same directory, then renamed over `path` (atomic on POSIX).
    With dp replicas each replica's rank 0 saves the same adapter; this way no process reads,
    and no writer leaves, a half-written file, whichever rename lands last.
    """
    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(partial, "wb") as file:
            for chunk in chunks:
                file.write(chunk)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def load_file(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a safetensors file at `path`, on the CPU (its `__metadata__`: `load_metadata`)."""
    data = Path(path).read_bytes()
    header, start = _header(data, path)
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        dtype = _DTYPES[entry["dtype"]]
        flat = torch.frombuffer(bytearray(data[start + begin : start + end]), dtype=torch.uint8)
        tensors[name] = flat.view(dtype).reshape(entry["shape"])
    return tensors


def load_metadata(path: str | Path) -> dict[str, str]:
    """The `__metadata__` strings of a safetensors file ({} when it has none)."""
    with open(path, "rb") as file:
        data = file.read(8)
        data += file.read(struct.unpack("<Q", data)[0] if len(data) == 8 else 0)
    return dict(_header(data, path)[0].get("__metadata__", {}))


def _header(data: bytes, path: str | Path) -> tuple[dict, int]:
    if len(data) < 8 or len(data) < 8 + struct.unpack("<Q", data[:8])[0]:
        raise ValueError(f"{path}: not a safetensors file (too short for its header)")
    length = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + length]), 8 + length
