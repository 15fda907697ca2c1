"""Reading and writing checkpoint folders in the published format: config.json plus safetensors shards.

Tensors are memory-mapped and read one at a time, so loading never holds two copies of the weights,
and a tensor-parallel rank reads only the slice it keeps.

A model module says how its weights are named and laid out in each published checkpoint layout with a
table of `TensorRule`s (its `CHECKPOINT_RULES`); the functions here apply such a table both ways:
`match_tensor` for loading, `checkpoint_tensors` / `save_checkpoint` for writing.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

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


def write_shards(
    tensors: dict[str, np.ndarray], folder: Path, num_shards: int = 1, bf16: bool = False
) -> None:
    """`model.safetensors`, or `num_shards` numbered shards (tensors dealt round-robin) and their index."""
    names = list(tensors)
    groups = [names[k::num_shards] for k in range(num_shards)]
    weight_map = {}
    for k, group in enumerate(groups):
        file = (
            f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" if len(groups) > 1 else "model.safetensors"
        )
        save_safetensors({name: tensors[name] for name in group}, folder / file, bf16=bf16)
        weight_map |= {name: file for name in group}
    if len(groups) > 1:
        (folder / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))


@contextmanager
def staged_folder(out: Path, replace: bool = True) -> Iterator[Path]:
    """A new folder beside `out` to write into; when the block succeeds, one rename makes it `out`, so
    nobody sees a half-written `out`. An existing `out` is replaced, or with `replace=False` kept (another
    process got there first) and the staged copy dropped."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        yield staging
        if replace and out.exists():
            shutil.rmtree(out)
        try:
            os.replace(staging, out)
        except OSError:
            if replace or not out.exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# Checkpoint layouts as data: a model module's CHECKPOINT_RULES, applied to read and to write.


@dataclass(frozen=True)
class TensorRule:
    """Where one weight of a model is stored in each checkpoint layout.

    Names are templates: `{i}` (or any `{field}`) stands for an index, such as a layer's, and takes the
    same value in all of them. A layout in `transposed_in` stores the transpose of each part.
    """

    target: str  # the weight as the model loads it: a key of its weight_shapes / weight_specs
    parameter: str  # the model parameter holding it
    tensors: Mapping[str, tuple[str, ...]]  # layout -> tensors holding its parts in order; one name: all
    transposed_in: tuple[str, ...] = ()  # layouts that store its tensors transposed ([out, in])


class TensorMatch(NamedTuple):
    target: str
    part: int | None  # None: the tensor holds all the target's parts, fused along the out axis
    is_transposed: bool


@functools.cache
def _template_pattern(template: str) -> re.Pattern:
    pieces = re.split(r"\{(\w+)\}", template)  # literal, field, literal, field, ..., literal
    regex = "".join(re.escape(p) if k % 2 == 0 else f"(?P<{p}>\\d+)" for k, p in enumerate(pieces))
    return re.compile(regex + r"\Z")


def _match_template(template: str, name: str) -> dict[str, str] | None:
    match = _template_pattern(template).match(name)
    return match.groupdict() if match else None


def layouts(rules: Sequence[TensorRule]) -> list[str]:
    return list(dict.fromkeys(layout for rule in rules for layout in rule.tensors))


def match_tensor(rules: Sequence[TensorRule], layout: str, name: str) -> TensorMatch | None:
    """What a checkpoint tensor of `layout` holds, or None if no rule names it."""
    for rule in rules:
        templates = rule.tensors.get(layout, ())
        for part, template in enumerate(templates):
            fields = _match_template(template, name)
            if fields is not None:
                fused = len(templates) == 1
                return TensorMatch(
                    rule.target.format(**fields), None if fused else part, layout in rule.transposed_in
                )
    return None


def detect_layout(rules: Sequence[TensorRule], names: Iterable[str]) -> str:
    """The layout whose rules name the most of a checkpoint's tensors."""
    names = list(names)
    return max(
        layouts(rules), key=lambda layout: sum(match_tensor(rules, layout, n) is not None for n in names)
    )


def raise_if_unsupported(
    folder: Path, unsupported: Mapping[str, Sequence[str]], names: Iterable[str]
) -> None:
    """`unsupported` maps what a kind of checkpoint is to glob patterns of tensors only it has."""
    for what, patterns in unsupported.items():
        found = [name for name in names if any(fnmatch.fnmatchcase(name, p) for p in patterns)]
        if found:
            more = f" and {len(found) - 3} more" if len(found) > 3 else ""
            raise CheckpointError(
                f"{folder}: {what} are not supported yet (tensors {', '.join(found[:3])}{more})"
            )


def _rule_for_target(rules: Sequence[TensorRule], target: str) -> tuple[TensorRule, dict[str, str]]:
    for rule in rules:
        fields = _match_template(rule.target, target)
        if fields is not None:
            return rule, fields
    raise KeyError(f"no checkpoint rule for the model's weight {target!r}")


def parameter_name(rules: Sequence[TensorRule], target: str) -> str:
    """The model parameter that holds a weight the model loads."""
    rule, fields = _rule_for_target(rules, target)
    return rule.parameter.format(**fields)


def fused_shape(part_shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
    """The shape of parts concatenated along their last (out) axis."""
    return (*part_shapes[0][:-1], sum(shape[-1] for shape in part_shapes))


def split_parts(array: np.ndarray, part_shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    bounds = np.cumsum([shape[-1] for shape in part_shapes])[:-1]
    return np.split(array, bounds, axis=-1)


def checkpoint_tensors(
    state: Mapping[str, np.ndarray],
    rules: Sequence[TensorRule],
    weight_shapes: Mapping[str, list[tuple[int, ...]]],
    layout: str,
) -> dict[str, np.ndarray]:
    """A model's parameters (`state`, by parameter name) as the tensors of a checkpoint `layout`.

    `weight_shapes` is the model's: the weights it loads, in the order to write them, with their parts.
    """
    tensors = {}
    for target, part_shapes in weight_shapes.items():
        rule, fields = _rule_for_target(rules, target)
        parameter = rule.parameter.format(**fields)
        templates = rule.tensors[layout]
        parts = _parameter_parts(parameter, state[parameter], part_shapes, len(templates))
        for template, part in zip(templates, parts, strict=True):
            tensors[template.format(**fields)] = part.T if layout in rule.transposed_in else part
    return tensors


def _parameter_parts(
    name: str, array: np.ndarray, part_shapes: Sequence[tuple[int, ...]], num_tensors: int
) -> list[np.ndarray]:
    """The parameter whole when one tensor stores it, else split into its parts."""
    if tuple(array.shape) != fused_shape(part_shapes):
        raise ValueError(f"{name} has shape {list(array.shape)}, expected {list(fused_shape(part_shapes))}")
    return [array] if num_tensors == 1 else split_parts(array, part_shapes)


def save_checkpoint(
    folder: str | Path,
    state: Mapping[str, np.ndarray],
    module: ModuleType,
    raw_config: dict,
    layout: str,
    num_shards: int = 1,
    bf16: bool = False,
) -> None:
    """Writes a model's parameters as a checkpoint of `layout`: safetensors shards and config.json.

    `module` is the model's (CONFIG_CLASS, CHECKPOINT_RULES, weight_shapes); `raw_config` its config.json.
    """
    rules = module.CHECKPOINT_RULES
    if layout not in layouts(rules):
        raise ValueError(f"unknown checkpoint layout {layout!r}; the model's are {layouts(rules)}")
    weight_shapes = module.weight_shapes(module.CONFIG_CLASS.from_dict(raw_config))
    folder = Path(folder)
    write_shards(checkpoint_tensors(state, rules, weight_shapes, layout), folder, num_shards, bf16)
    (folder / "config.json").write_text(json.dumps(raw_config, indent=2))
