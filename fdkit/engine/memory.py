"""The memory plan: before any weight is read, what a config needs (weights, KV cache, runtime) against
what the machine has, and how many KV blocks to allocate. A config that cannot fit is refused at once,
with the numbers and where it would fit, instead of being OOM-killed halfway through loading.

Estimates per rank (GB = 10**9 bytes), within a few % (attention heads that split unevenly or are
replicated, and the MoE gate, count as split): weights from the model module's `weight_shapes` (and a
tied LM head's own copy), 1-D tensors replicated and the rest split by tp; KV cache 2 * layers *
kv_heads_per_rank * head_dim * block_size * dtype bytes per block, kv_heads_per_rank the most any rank
holds (fdkit.parallel.head_shard); runtime RUNTIME_BYTES, plus on CPU what loading takes beyond the KV
cache (which is allocated after it): twice the largest tensor in float32, read whole, then sliced. On
CPU the ranks of one host share its available RAM (psutil, or what a container's cgroup memory limit
leaves, if less); on GPU each rank has one device's memory
(paddle's device properties: not tested here, no GPU).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from fdkit.checkpoint import CheckpointError, read_config
from fdkit.engine.kv_cache import num_blocks_for
from fdkit.models import model_module

logger = logging.getLogger(__name__)

GB, GIB = 10**9, 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CPU_DTYPES = ("float32",)  # paddle's dygraph has no CPU matmul for bfloat16 / float16 (compiled: bf16)
MIN_FIT_MODEL_LEN = 4096  # with max_model_len unset, a machine that cannot hold this context is refused
RUNTIME_BYTES = 5 * 10**8  # paddle, Python, the tokenizer: a rank of the tiny test model is 0.39 GB RSS
DEFAULT_UTILIZATION = {"cpu": 0.5, "gpu": 0.9}
SUGGESTED_TP = (1, 2, 4, 8)
CGROUP_ROOT = Path("/sys/fs/cgroup")
NO_CGROUP_LIMIT = 2**60  # cgroup v1 writes "no limit" as about 2**63 (rounded to the page size)


class PlanError(CheckpointError):
    """A config this machine cannot run (memory, dtype, batch limits), found before any weight is read."""


@dataclass
class ModelFootprint:
    """What the plan needs of a model, from its config.json alone."""

    name: str
    shapes: list[tuple[int, ...]]
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position: int
    is_dense: bool = True  # no MoE layers

    @classmethod
    def of(cls, raw_config: dict, name: str) -> ModelFootprint:
        module = model_module(raw_config)
        c = module.CONFIG_CLASS.from_dict(raw_config)
        weights = module.weight_shapes(c)  # target -> the shapes of its parts
        if c.tie_word_embeddings:  # the LM head holds its own copy of the embedding (fdkit/parallel.py)
            weights = {**weights, "lm_head": weights["embed_tokens"]}
        shapes = [tuple(shape) for parts in weights.values() for shape in parts]
        dims = (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim)
        is_dense = not raw_config.get("moe_num_experts")
        return cls(name, shapes, *dims, max_position=c.max_position_embeddings, is_dense=is_dense)

    @property
    def num_parameters(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes)

    def weight_bytes(self, tp: int, dtype: str) -> int:
        elements = sum(math.prod(s) // (1 if len(s) == 1 else tp) for s in self.shapes)
        return elements * DTYPE_BYTES[dtype]

    def block_bytes(self, tp: int, dtype: str, block_size: int) -> int:
        from fdkit.parallel import head_shard  # imports paddle: `import fdkit` does not

        kv_heads = max(len(head_shard(self.num_heads, self.num_kv_heads, r, tp).kv_heads) for r in range(tp))
        return 2 * self.num_layers * kv_heads * self.head_dim * block_size * DTYPE_BYTES[dtype]

    def loading_bytes(self, device: str) -> int:
        """Host memory a rank needs while it loads, beyond its weights: freed before the KV cache."""
        return 2 * 4 * max(math.prod(shape) for shape in self.shapes) if device == "cpu" else 0

    def rank_bytes(self, tp: int, dtype: str, block_size: int, num_blocks: int, device: str) -> int:
        kv = num_blocks * self.block_bytes(tp, dtype, block_size)
        return self.weight_bytes(tp, dtype) + RUNTIME_BYTES + max(kv, self.loading_bytes(device))


@dataclass
class MemoryPlan:
    model: ModelFootprint
    device: str  # "cpu" or "gpu"
    dtype: str
    tp: int
    block_size: int
    max_model_len: int
    available_bytes: int  # the host's available RAM (cpu) or one device's memory (gpu)
    num_kv_blocks: int = 0
    num_weight_copies: int = 1  # a compiled float32 step keeps the dygraph weights too (one-row steps)

    @property
    def num_sharing(self) -> int:
        """Ranks that share `available_bytes`: all of them on one CPU host, one per GPU."""
        return self.tp if self.device == "cpu" else 1

    @property
    def weight_bytes(self) -> int:
        return self.num_weight_copies * self.model.weight_bytes(self.tp, self.dtype)

    @property
    def block_bytes(self) -> int:
        return self.model.block_bytes(self.tp, self.dtype, self.block_size)

    def runtime_bytes(self, num_blocks: int) -> int:
        """A rank's memory beyond its weights and KV cache."""
        kv = num_blocks * self.block_bytes
        return RUNTIME_BYTES + max(0, self.model.loading_bytes(self.device) - kv)

    @property
    def num_min_blocks(self) -> int:
        return num_blocks_for(self.max_model_len, self.block_size)

    def needed_bytes(self, num_blocks: int) -> int:
        rank = self.model.rank_bytes(self.tp, self.dtype, self.block_size, num_blocks, self.device)
        extra = (self.num_weight_copies - 1) * self.model.weight_bytes(self.tp, self.dtype)
        return self.num_sharing * (rank + extra)

    def auto_kv_blocks(self, utilization: float, max_num_seqs: int) -> int:
        """`utilization` of what weights and runtime leave, at most what max_num_seqs sequences use."""
        left = self.available_bytes // self.num_sharing - self.weight_bytes - RUNTIME_BYTES
        by_memory = int(utilization * left) // self.block_bytes
        return max(0, min(by_memory, max_num_seqs * self.num_min_blocks))

    def summary(self) -> str:
        tokens = self.num_kv_blocks * self.block_size
        where = "this host" if self.device == "cpu" else "each GPU"
        return (
            f"memory plan for {self.model.name} ({self.dtype}, tp={self.tp}, {self.device}): per rank "
            f"{gb(self.weight_bytes)} of weights ({self.model.num_parameters / 1e6:.1f}M parameters in all), "
            f"{gb(self.runtime_bytes(self.num_kv_blocks))} runtime, KV cache "
            f"{gb(self.num_kv_blocks * self.block_bytes)}"
            f" = {self.num_kv_blocks} blocks of {self.block_size} tokens = {tokens} tokens: max_model_len "
            f"{self.max_model_len} (full-length sequences: {tokens // self.max_model_len}); {where} has "
            f"{gb(self.available_bytes)} available, {gb(self.needed_bytes(self.num_kv_blocks))} planned"
        )


def gb(num_bytes: float) -> str:
    return f"{num_bytes / GB:.1f} GB"


def device_kind(device: str) -> str:
    return "cpu" if device == "cpu" else "gpu"


def available_memory(device: str, cgroup_root: Path = CGROUP_ROOT) -> int:
    """Host RAM available now, within the container's memory limit if any (cpu), or the total memory of
    the device (gpu: untested here)."""
    if device_kind(device) == "cpu":
        import psutil

        host = psutil.virtual_memory().available
        container = cgroup_available(cgroup_root)
        return host if container is None else min(host, container)
    import paddle

    index = int(device.partition(":")[2] or 0)
    return int(paddle.device.cuda.get_device_properties(index).total_memory)


def cgroup_available(root: Path = CGROUP_ROOT) -> int | None:
    """What this container's memory limit leaves (cgroup v2 and v1, the smaller); None if unlimited."""
    v1 = root / "memory"
    left = [
        _cgroup_left(root / "memory.max", root / "memory.current", root / "memory.stat", "inactive_file"),
        _cgroup_left(
            v1 / "memory.limit_in_bytes",
            v1 / "memory.usage_in_bytes",
            v1 / "memory.stat",
            "total_inactive_file",
        ),
    ]
    found = [value for value in left if value is not None]
    return min(found) if found else None


def _cgroup_left(limit_file: Path, usage_file: Path, stat_file: Path, reclaimable: str) -> int | None:
    """limit - usage, the usage without the page cache the kernel reclaims first (as `docker stats`)."""
    try:
        limit, usage = limit_file.read_text().strip(), int(usage_file.read_text())
    except (OSError, ValueError):
        return None
    if not limit.isdigit() or int(limit) >= NO_CGROUP_LIMIT:  # "max" (v2), or v1's "no limit" number
        return None
    return max(0, int(limit) - usage + _stat_value(stat_file, reclaimable))


def _stat_value(stat_file: Path, key: str) -> int:
    try:
        lines = stat_file.read_text().splitlines()
    except OSError:
        return 0
    values = dict(line.partition(" ")[::2] for line in lines)
    return int(values.get(key, 0) or 0)


def plan_memory(config, model_path: str | Path, available_bytes: int | None = None) -> MemoryPlan:
    """The plan of `config` (an FdkitConfig) for the checkpoint at `model_path`, read from its
    config.json alone. Raises PlanError, with what would fit, if the machine cannot run it."""
    engine = config.engine
    if engine.dtype not in DTYPE_BYTES:
        raise PlanError(f"engine.dtype must be one of {list(DTYPE_BYTES)}, got {engine.dtype!r}")
    model = ModelFootprint.of(read_config(model_path), Path(str(config.model.path)).name)
    plan = MemoryPlan(
        model=model,
        device=device_kind(engine.device),
        dtype=dygraph_dtype(engine),  # sizes: a CPU loads float32 (and keeps a float32 KV cache)
        tp=config.tp,
        block_size=engine.block_size,
        max_model_len=engine.max_model_len or model.max_position,
        available_bytes=available_memory(engine.device) if available_bytes is None else available_bytes,
        num_weight_copies=_num_weight_copies(engine, model),
    )
    requested = _requested_blocks(plan, engine)
    is_model_len = engine.max_model_len is None  # the model's, lowered to what the KV cache holds
    if is_model_len:  # the machine must hold at least a shorter context
        plan.max_model_len = min(model.max_position, MIN_FIT_MODEL_LEN)
    _check_fits(plan, requested or plan.num_min_blocks)
    _check_runnable(plan, engine)
    plan.max_model_len = engine.max_model_len or model.max_position
    utilization = engine.memory_utilization or DEFAULT_UTILIZATION[plan.device]
    plan.num_kv_blocks = requested or plan.auto_kv_blocks(utilization, engine.max_num_seqs)
    if is_model_len:
        _lower_max_model_len(plan)
    _check_kv(plan, requested is None, utilization)
    return plan


def _lower_max_model_len(plan: MemoryPlan) -> None:
    """The model's context, or what the KV cache holds if less (logged)."""
    tokens = max(1, plan.num_kv_blocks) * plan.block_size
    if tokens < plan.max_model_len:
        logger.warning(
            "max_model_len lowered from the model's %d to %d tokens, what the KV cache holds (%d blocks of "
            "%d); set engine.max_model_len, engine.kv_cache_gib or engine.memory_utilization to change it",
            plan.max_model_len, tokens, plan.num_kv_blocks, plan.block_size,
        )  # fmt: skip
        plan.max_model_len = tokens


def _requested_blocks(plan: MemoryPlan, engine) -> int | None:
    """The KV cache's size in blocks when the config sets it (num_kv_blocks or kv_cache_gib)."""
    if engine.num_kv_blocks:
        return engine.num_kv_blocks
    if engine.kv_cache_gib is not None:
        return int(engine.kv_cache_gib * GIB // plan.block_bytes)
    return None


def _check_fits(plan: MemoryPlan, num_blocks: int) -> None:
    if plan.needed_bytes(num_blocks) <= plan.available_bytes:
        return
    n = plan.num_sharing
    ranks = f" over {plan.tp} ranks" if n > 1 else ""
    where = "this host has" if plan.device == "cpu" else "each GPU has"
    raise PlanError(
        f"{plan.model.name} needs {gb(n * plan.weight_bytes)} of weights in {plan.dtype} "
        f"(+ {gb(n * num_blocks * plan.block_bytes)} KV cache, + {gb(n * plan.runtime_bytes(num_blocks))} "
        f"runtime{ranks}) but {where} {gb(plan.available_bytes)} available; it would fit "
        f"{_advice(plan, num_blocks)}"
    )


def _advice(plan: MemoryPlan, num_blocks: int) -> str:
    """Where it would fit: a host with enough RAM (CPU), or GPUs of a size, at each tp."""
    model = plan.model

    def on_gpus(dtype: str) -> str:
        sizes = [
            f"{gb(model.rank_bytes(tp, dtype, plan.block_size, num_blocks, 'gpu'))} each at tp={tp}"
            for tp in SUGGESTED_TP
        ]
        return f"on GPUs in {dtype} with " + ", ".join(sizes[:-1]) + f" or {sizes[-1]}"

    if plan.device == "gpu":
        dtypes = [plan.dtype] + (["bfloat16"] if plan.dtype == "float32" else [])
        return ", or ".join(on_gpus(dtype) for dtype in dtypes)
    host = model.rank_bytes(1, "float32", plan.block_size, num_blocks, "cpu")
    return (
        f"on a host with {gb(host)} available in float32 at tp=1 (on CPU the ranks share the host's RAM, "
        f"so a larger tp does not help, and weights load in float32), or {on_gpus('bfloat16')}"
    )


def _num_weight_copies(engine, model: ModelFootprint) -> int:
    """Two where float32 programs keep the dygraph weights for one-row steps (fdkit/engine/compiled.py)."""
    is_programs = is_compiled(engine) and not engine.linear_kernel
    return 2 if is_programs and engine.dtype == "float32" and model.is_dense else 1


def is_compiled(engine) -> bool:
    """Whether the step is compiled (fdkit/engine/compiled.py): on CPU only; the GPU path runs dygraph
    until a GPU can verify it."""
    return bool(engine.compile) and device_kind(engine.device) == "cpu"


def dygraph_dtype(engine) -> str:
    """The dtype of the weights as loaded, the KV cache and attention: float32 on CPU, where paddle's
    dygraph has no bfloat16 matmul (a compiled bfloat16 step holds its own bfloat16 weights)."""
    return "float32" if device_kind(engine.device) == "cpu" else engine.dtype


def cpu_has_bfloat16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """avx512_bf16 or AMX: what oneDNN's bfloat16 matmul needs to beat float32."""
    return bool(cpu_flags(cpuinfo) & {"avx512_bf16", "amx_bf16"})


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's instruction-set flags (empty where /proc/cpuinfo cannot be read)."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return set()
    return {flag for line in lines if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def _check_runnable(plan: MemoryPlan, engine) -> None:
    if plan.device != "cpu" or engine.dtype in CPU_DTYPES:
        return
    if engine.dtype != "bfloat16":
        raise PlanError(
            f"engine.dtype={engine.dtype} cannot run on CPU: paddle {version('paddlepaddle')} has no CPU "
            "kernels for it; use engine.dtype=float32 or bfloat16, or a GPU build of paddle with "
            "engine.device=gpu"
        )
    if not engine.compile:
        raise PlanError(
            "engine.dtype=bfloat16 on CPU needs the compiled step (engine.compile=true): paddle's "
            "dygraph has no CPU bfloat16 matmul"
        )
    if not cpu_has_bfloat16():
        raise PlanError(
            "engine.dtype=bfloat16 on CPU needs a CPU with avx512_bf16 or AMX (this one has neither, see "
            "the flags in /proc/cpuinfo); use engine.dtype=float32"
        )


def _check_kv(plan: MemoryPlan, is_auto: bool, utilization: float) -> None:
    if plan.num_kv_blocks >= plan.num_min_blocks:
        return
    tokens = plan.num_kv_blocks * plan.block_size
    if is_auto:
        raise PlanError(
            f"with engine.memory_utilization={utilization} the KV cache of {plan.model.name} gets "
            f"{plan.num_kv_blocks} blocks ({tokens} tokens) per rank, fewer than max_model_len "
            f"{plan.max_model_len} needs: lower engine.max_model_len (--max-model-len) to {tokens} or "
            "raise engine.memory_utilization (--gpu-memory-utilization)"
        )
    raise PlanError(
        f"the KV cache holds {plan.num_kv_blocks} blocks of {plan.block_size} tokens, but max_model_len "
        f"{plan.max_model_len} needs {plan.num_min_blocks}: raise engine.kv_cache_gib or "
        "engine.num_kv_blocks (or leave both null to size it from memory), or lower engine.max_model_len"
    )
