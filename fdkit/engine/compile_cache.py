"""Compiled programs on disk, so that a restart skips tracing: `{root}/{key}/{program}.json` and
`.pdiparams`, the key a hash of all the programs depend on (model files, dtype, the rank's shard, paddle
and the source of the code that traces them). A directory appears whole or not at all (written aside,
then renamed), so engines starting together never read a half-written one. root None: a temporary
directory, removed once the programs are loaded."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import paddle


class CompileCache:
    def __init__(self, root: str | Path | None, key_fields: dict):
        self.key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:24]
        self.temporary = None if root else tempfile.TemporaryDirectory(prefix="fdkit-compiled-")
        self.root = Path(root).expanduser() if root else Path(self.temporary.name)
        self.dir = self.root / self.key
        self.staging: Path | None = None
        self.was_hit = False

    def is_complete(self, names) -> bool:
        """Whether every program is on disk; if not, the next saves go to a staging directory."""
        self.was_hit = all(all(path.is_file() for path in self.files(name)) for name in names)
        if not self.was_hit:
            self.root.mkdir(parents=True, exist_ok=True)
            self.staging = Path(tempfile.mkdtemp(prefix=f".{self.key}-", dir=self.root))
        return self.was_hit

    def save(self, name: str, layer: paddle.nn.Layer, input_spec: list) -> None:
        static = paddle.jit.to_static(layer, full_graph=True)
        paddle.jit.save(static, str(self.staging / name), input_spec=input_spec)

    def commit(self) -> None:
        try:
            self.staging.rename(self.dir)
        except OSError:  # another engine committed the same programs first
            shutil.rmtree(self.staging, ignore_errors=True)
        self.staging = None

    def files(self, name: str) -> tuple[Path, Path]:
        return self.dir / f"{name}.json", self.dir / f"{name}.pdiparams"

    def close(self) -> None:
        """Removes a temporary cache (loaded predictors keep what they read)."""
        if self.temporary is not None:
            self.temporary.cleanup()


def model_signature(model_path: str | Path) -> list:
    """What identifies a checkpoint folder's contents without reading the weights: each file's name,
    size and modification time."""
    files = sorted(p for p in Path(model_path).iterdir() if p.is_file())
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def source_signature(*modules) -> str:
    """A hash of the source of the modules that trace the programs: changed code, new programs."""
    digest = hashlib.sha256()
    for module in modules:
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()
