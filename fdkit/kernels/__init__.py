"""fdkit's CPU kernels: paddle custom operators in C++ (`*.cc` here), built with the machine's compiler on
first use (~10 s) into `{root}/kernels-{key}`, the key a hash of the sources, the flags, paddle's version
and the CPU's instruction sets (they are built for this CPU). Later starts load the built library. Where
they cannot be built (no compiler), the engine runs paddle's own ops instead, with a warning."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import paddle

from fdkit.engine.compile_cache import writable_dir
from fdkit.engine.memory import cpu_flags

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = [HERE / f for f in ("paged_attention.cc", "attention_tiles.h", "attention_decode.h", "ops.cc")]
ONEDNN_SOURCES = [HERE / "linear.cc", HERE / "dnnl_api.h"]  # built where paddle ships oneDNN's library
ONEDNN_LIBRARY = "libdnnl.so.3"
CXX_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]
_loaded: dict[str, ModuleType] = {}  # by key: paddle registers a library's operators once per process


def paged_attention(root: str | None, num_threads: int, bf16: bool = False) -> Callable | None:
    """Attention over the paged cache in place (`paged_attention.cc`): `(q, k_cache, v_cache, key_slots,
    query_rows, num_keys, kv_heads, num_kv_heads, scale) -> [tokens, heads * d]`; with `bf16`, prompt
    blocks multiply in bf16 where the CPU has avx512_bf16. None where it cannot be built."""
    module = load_kernels(root)
    if module is None:
        return None
    op = module.fdkit_paged_attention

    def attend(*args):
        return op(*args, bf16, num_threads)

    return attend


class FusedOps:
    """The small ops around the matmuls and attention, one C++ call each (`ops.cc`), float32."""

    def __init__(self, module: ModuleType, num_threads: int):
        self.module, self.num_threads = module, num_threads

    def rms_norm(self, x: paddle.Tensor, weight: paddle.Tensor, eps: float) -> paddle.Tensor:
        return self.module.fdkit_rms_norm(x, weight, eps, self.num_threads)

    def split_rotate(self, qkv, cos, sin, num_heads: int, num_kv_heads: int) -> list[paddle.Tensor]:
        """q [tokens, heads, d], k and v [tokens, kv_heads, d] of a QKV projection, q and k rotated."""
        return self.module.fdkit_split_rotate(qkv, cos, sin, num_heads, num_kv_heads, self.num_threads)

    def silu_mul(self, gate_up: paddle.Tensor) -> paddle.Tensor:
        return self.module.fdkit_silu_mul(gate_up, self.num_threads)

    def argmax(self, logits: paddle.Tensor) -> paddle.Tensor:
        """Each row's argmax (int64 [rows]), the first index on ties."""
        return self.module.fdkit_argmax(logits, self.num_threads)

    def write_cache(self, k_cache, v_cache, k, v, slot_mapping) -> None:
        """k, v [tokens, kv_heads, d] into the head-major caches at `slot_mapping`, in place."""
        self.module.fdkit_write_cache(k_cache, v_cache, k, v, slot_mapping)


def fused_ops(root: str | None, num_threads: int) -> FusedOps | None:
    """None where the kernels cannot be built."""
    module = load_kernels(root)
    return None if module is None else FusedOps(module, num_threads)


class PackedLinear:
    """Linear layers through oneDNN with packed weights (`linear.cc`): `pack` a float32 [in, out] weight
    once, then `x W` from the packed bytes, in float32 or bf16."""

    def __init__(self, module: ModuleType, num_threads: int):
        self.module, self.num_threads = module, num_threads

    def pack(self, weight: paddle.Tensor, bf16: bool) -> paddle.Tensor:
        return self.module.fdkit_linear_pack(weight, bf16)

    def __call__(self, x: paddle.Tensor, packed: paddle.Tensor, out_features: int, bf16: bool):
        return self.module.fdkit_linear(x, packed, out_features, bf16, self.num_threads)


def packed_linear(root: str | None, num_threads: int) -> PackedLinear | None:
    """None where the kernels cannot be built or paddle ships no oneDNN library."""
    module = load_kernels(root)
    if module is None or not hasattr(module, "fdkit_linear"):
        return None
    return PackedLinear(module, num_threads)


def load_kernels(root: str | None) -> ModuleType | None:
    try:
        key = _key()
    except OSError as exc:  # an install without the sources
        logger.warning("fdkit's CPU kernels could not be built (%s): paddle's ops run instead", exc)
        return None
    if key not in _loaded:
        module = _build_or_load(root, key)
        if module is None:
            return None
        _loaded[key] = module
    return _loaded[key]


def _build_or_load(root: str | None, key: str) -> ModuleType | None:
    name = f"fdkit_kernels_{key}"
    with _build_dir(root, key) as folder, _locked(folder):
        library = folder / name / f"{name}.so"
        try:
            if library.exists():
                return _import_built(name, folder / name)
            from paddle.utils.cpp_extension import load

            sources = [str(s) for s in _sources() if s.suffix == ".cc"]
            return load(name, sources, CXX_FLAGS, extra_ldflags=_link_flags(), build_directory=str(folder))
        except Exception as exc:  # no compiler, or a broken build: paddle's ops instead
            logger.warning("fdkit's CPU kernels could not be built (%s): paddle's ops run instead", exc)
            return None


def _paddle_libs() -> Path:
    return Path(paddle.__file__).parent / "libs"


def _sources() -> list[Path]:
    return SOURCES + (ONEDNN_SOURCES if (_paddle_libs() / ONEDNN_LIBRARY).exists() else [])


def _link_flags() -> list[str]:
    """Paddle's OpenMP runtime, and its oneDNN library where linear.cc is built."""
    libs = _paddle_libs()
    if not (libs / ONEDNN_LIBRARY).exists():
        return _openmp_link_flags()
    return [*_openmp_link_flags(), f"-L{libs}", f"-l:{ONEDNN_LIBRARY}", f"-Wl,-rpath,{libs}"]


def _openmp_link_flags() -> list[str]:
    """Paddle's own OpenMP runtime (Intel's, which MKL and oneDNN use): with GNU's libgomp beside it, each
    runtime's threads spin-waited while the other's worked (the decode step ran 2.8x slower)."""
    libs = _paddle_libs()
    if not (libs / "libiomp5.so").exists():
        return ["-fopenmp"]
    return [f"-L{libs}", "-liomp5", f"-Wl,-rpath,{libs}"]


def _import_built(name: str, folder: Path) -> ModuleType:
    from paddle.utils.cpp_extension.extension_utils import _import_module_from_library

    return _import_module_from_library(name, str(folder))


def _key() -> str:
    digest = hashlib.sha256()
    for source in _sources():
        digest.update(source.name.encode() + source.read_bytes())
    digest.update(" ".join([*CXX_FLAGS, paddle.__version__, *sorted(cpu_flags())]).encode())
    return digest.hexdigest()[:16]


@contextmanager
def _build_dir(root: str | None, key: str):
    """`{root}/kernels-{key}`, or a temporary folder when root is None or not writable."""
    folder = writable_dir(Path(root).expanduser() / f"kernels-{key}") if root else None
    if folder is not None:
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="fdkit-kernels-") as temporary:
        yield Path(temporary)


@contextmanager
def _locked(folder: Path):
    """One builder at a time: tensor-parallel ranks start together."""
    with open(folder / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
