"""Builds a model from a checkpoint folder and fills its weights, shard by shard."""

from __future__ import annotations

import logging
from pathlib import Path
from types import ModuleType

import numpy as np
import paddle
from paddle import nn
from tqdm.auto import tqdm

from fdkit.checkpoint import (
    CheckpointError,
    CheckpointReader,
    TensorMatch,
    detect_layout,
    fused_shape,
    match_tensor,
    raise_if_unsupported,
    split_parts,
)
from fdkit.models import model_module
from fdkit.parallel import rank_view

logger = logging.getLogger(__name__)


def load_weights(model: nn.Layer, module: ModuleType, folder: Path, show_progress: bool = True) -> None:
    """Reads every tensor once, turns it to our parameters' orientation, keeps this rank's shard.

    `module.CHECKPOINT_RULES` says what each tensor holds, in the layout that names most of them;
    tensors no rule names are skipped, those `module.UNSUPPORTED_TENSORS` names are an error.
    """
    reader = CheckpointReader(folder)
    rules, names = module.CHECKPOINT_RULES, reader.names()
    raise_if_unsupported(folder, getattr(module, "UNSUPPORTED_TENSORS", {}), names)
    layout = detect_layout(rules, names)
    filler = _WeightFiller(model.weight_specs())
    for name in tqdm(names, desc="Loading weights", unit="tensor", disable=not show_progress):
        match = match_tensor(rules, layout, name)
        if match is None or match.target not in filler.specs:
            logger.debug("ignoring checkpoint tensor %s", name)
            continue
        array = reader.get(name)
        filler.add(name, match, array.T if match.is_transposed else array)
    filler.raise_if_incomplete(folder)


def rank_parameter_shapes(
    raw_config: dict, world_size: int = 1, expert_parallel: bool = False, rank: int = 0
) -> dict[str, tuple[int, ...]]:
    """Each parameter of the model as rank `rank` of `world_size` holds it, from config.json alone
    (nothing is allocated). Ranks differ only where the attention heads split unevenly
    (fdkit.parallel.head_shard). All are in the engine's dtype but MoE routers' `mlp.gate.weight` and
    `e_score_correction_bias`, which are float32."""
    module = model_module(raw_config)
    config = module.CONFIG_CLASS.from_dict(raw_config)
    with rank_view(world_size, expert_parallel, rank), paddle.LazyGuard():
        model = module.MODEL_CLASS(config, max_position=1)
    return {name: tuple(param.shape) for name, param in model.named_parameters()}


class _WeightFiller:
    """Hands each weight's parts to the layer that loads it, once all of them have been read."""

    def __init__(self, specs: dict[str, tuple[object, list[tuple[int, ...]]]]):
        self.specs = specs
        self.pending: dict[str, dict[int, np.ndarray]] = {}
        self.loaded: set[str] = set()

    def add(self, name: str, match: TensorMatch, array: np.ndarray) -> None:
        part_shapes = self.specs[match.target][1]
        if match.part is None:  # all parts, fused along the out axis
            _check_shape(name, array, fused_shape(part_shapes))
            self._load(match.target, split_parts(array, part_shapes), name)
            return
        _check_shape(name, array, part_shapes[match.part])
        parts = self.pending.setdefault(match.target, {})
        parts[match.part] = array
        if len(parts) == len(part_shapes):
            del self.pending[match.target]
            self._load(match.target, [parts[i] for i in range(len(part_shapes))], name)

    def _load(self, target: str, parts: list[np.ndarray], name: str) -> None:
        self.specs[target][0].load(parts, name)
        self.loaded.add(target)

    def raise_if_incomplete(self, folder: Path) -> None:
        missing = sorted(set(self.specs) - self.loaded)
        if missing:
            raise CheckpointError(
                f"{folder}: checkpoint has no tensor for {', '.join(missing[:5])}"
                + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            )


def _check_shape(name: str, array: np.ndarray, expected: tuple[int, ...]) -> None:
    if tuple(array.shape) != tuple(expected):
        raise CheckpointError(
            f"tensor {name} has shape {list(array.shape)} but config.json implies {list(expected)}"
        )
