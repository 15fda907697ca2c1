"""Reading and writing checkpoint folders in the published format: config.json plus safetensors shards.

Tensors are memory-mapped and read one at a time, so loading never holds two copies of the weights,
and a tensor-parallel rank reads only the slice it keeps.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

DTYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,  # widened to float32 on read: numpy has no bfloat16
    "F64": np.float64,
    "I64": np.int64,
    "I32": np.int32,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message says what is wrong and where."""


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


class SafetensorsFile:
    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        self.header = header
        self.data_start = 8 + header_len
        self._mmap = np.memmap(path, dtype=np.uint8, mode="r")

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        """The tensor as a float32 (or integer) array; a view of the file where no conversion is needed."""
        info = self.header[name]
        if info["dtype"] not in DTYPES:
            raise CheckpointError(f"{self.path.name}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        raw = self._mmap[self.data_start + begin : self.data_start + end]
        array = raw.view(DTYPES[info["dtype"]]).reshape(info["shape"])
        if info["dtype"] == "BF16":
            return bf16_to_f32(array)
        if info["dtype"] == "F16":
            return array.astype(np.float32)
        return array


class CheckpointReader:
    """All tensors of a checkpoint folder, by name, whatever shard holds them."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"checkpoint folder not found: {self.folder}")
        self.shard_paths = self._shard_paths()
        self.files = {path: SafetensorsFile(path) for path in self.shard_paths}
        self.location = {name: f for f in self.files.values() for name in f.keys()}

    def _shard_paths(self) -> list[Path]:
        index = self.folder / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            paths = [self.folder / name for name in dict.fromkeys(weight_map.values())]
            for path in paths:
                if not path.is_file():
                    raise CheckpointError(
                        f"{INDEX_FILE} names {path.name}, which is missing from {self.folder}"
                    )
            return paths
        paths = sorted(self.folder.glob("*.safetensors"))
        if not paths:
            raise CheckpointError(f"{self.folder}: no *.safetensors weights found")
        return paths

    def __contains__(self, name: str) -> bool:
        return name in self.location

    def names(self) -> list[str]:
        return list(self.location)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.location[name].shape(name)

    def get(self, name: str) -> np.ndarray:
        if name not in self.location:
            raise CheckpointError(f"{self.folder}: tensor {name!r} is missing from the checkpoint")
        return self.location[name].get(name)

    def iter_shards(self) -> Iterator[tuple[Path, list[str]]]:
        for path, file in self.files.items():
            yield path, file.keys()


def read_config(folder: str | Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json (is this an ERNIE 4.5 checkpoint folder?)")
    return json.loads(path.read_text())


def save_safetensors(tensors: dict[str, np.ndarray], path: Path, bf16: bool = False) -> None:
    """Writes float tensors as F32, or as BF16 (rounded to nearest even) when `bf16`."""
    header: dict = {"__metadata__": {"format": "pd"}}
    blobs, offset = [], 0
    for name, array in tensors.items():
        array = np.ascontiguousarray(array, dtype=np.float32)
        if bf16:
            bits = array.view(np.uint32)
            data = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        else:
            data = array
        blob = data.tobytes()
        header[name] = {
            "dtype": "BF16" if bf16 else "F32",
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    header_bytes = json.dumps(header).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for blob in blobs:
            f.write(blob)
