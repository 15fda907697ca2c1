"""Model registry: a checkpoint's `architectures` picks the module that builds and loads it."""

from __future__ import annotations

import importlib
from types import ModuleType

from fdkit.checkpoint import CheckpointError

# architecture name -> module with CONFIG_CLASS, MODEL_CLASS, CHECKPOINT_RULES, weight_shapes,
# DEFAULT_CHAT_TEMPLATE and optionally UNSUPPORTED_TENSORS (see fdkit.models.ernie4_5, ernie4_5_moe)
_REGISTRY = {
    "Ernie4_5ForCausalLM": "fdkit.models.ernie4_5",
    "Ernie4_5_ForCausalLM": "fdkit.models.ernie4_5",
    "Ernie4_5_MoeForCausalLM": "fdkit.models.ernie4_5_moe",
}


def model_module(raw_config: dict) -> ModuleType:
    for architecture in raw_config.get("architectures") or []:
        if architecture in _REGISTRY:
            return importlib.import_module(_REGISTRY[architecture])
    raise CheckpointError(
        f"unsupported architectures {raw_config.get('architectures')} "
        f"(model_type {raw_config.get('model_type')!r}); supported: {', '.join(_REGISTRY)}"
    )
