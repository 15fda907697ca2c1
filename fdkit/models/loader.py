"""Builds a model from a checkpoint folder and fills its weights, shard by shard."""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from types import ModuleType

import numpy as np
from paddle import nn
from tqdm.auto import tqdm

from fdkit.checkpoint import CheckpointError, CheckpointReader

logger = logging.getLogger(__name__)


def load_weights(model: nn.Layer, module: ModuleType, folder: Path, show_progress: bool = True) -> None:
    """Reads every tensor once, converts it to the model's orientation, keeps this rank's shard."""
    reader = CheckpointReader(folder)
    specs = model.weight_specs()
    pending: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
    loaded: set[str] = set()
    total = sum(len(names) for _, names in reader.iter_shards())
    with tqdm(total=total, desc="Loading weights", unit="tensor", disable=not show_progress) as bar:
        for _, names in reader.iter_shards():
            for name in names:
                _load_tensor(model, module, reader, name, specs, pending, loaded)
                bar.update(1)
    missing = sorted(set(specs) - loaded)
    if missing:
        raise CheckpointError(
            f"{folder}: checkpoint has no tensor for {', '.join(missing[:5])}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        )


def _load_tensor(model, module, reader, name, specs, pending, loaded) -> None:
    mapped = module.map_checkpoint_tensor(name, reader.get(name), model.config)
    if mapped is None or mapped[0] not in specs:
        logger.debug("ignoring checkpoint tensor %s", name)
        return
    target, part, array = mapped
    layer, part_shapes = specs[target]
    if part is None:  # fused along the out axis
        expected = (*part_shapes[0][:-1], sum(shape[-1] for shape in part_shapes))
        _check_shape(name, array, expected)
        bounds = np.cumsum([shape[-1] for shape in part_shapes])[:-1]
        layer.load(np.split(array, bounds, axis=-1), name)
        loaded.add(target)
        return
    _check_shape(name, array, part_shapes[part])
    pending[target][part] = array
    if len(pending[target]) == len(part_shapes):
        parts = pending.pop(target)
        layer.load([parts[i] for i in range(len(part_shapes))], name)
        loaded.add(target)


def _check_shape(name: str, array: np.ndarray, expected: tuple[int, ...]) -> None:
    if tuple(array.shape) != tuple(expected):
        raise CheckpointError(
            f"tensor {name} has shape {list(array.shape)} but config.json implies {list(expected)}"
        )
