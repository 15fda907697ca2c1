"""Compiled programs on disk, so that a restart skips tracing: `{root}/{key}/{program}.json` and
`.pdiparams`, the key a hash of all the programs depend on (the checkpoint's files, dtype, the rank's
shard, paddle, and fdkit's source). Programs are written to a staging directory, loaded from it (which
proves them whole: a short write does not load), then renamed into place, so engines starting together
never read a half-written directory. A cached directory that is incomplete or does not load is removed
and compiled again. An unwritable root, or root None, compiles into a temporary directory that is
removed once the programs are loaded: the engine never writes files but these.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import paddle

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # fdkit/
SAMPLE_BYTES = 1 << 16  # bytes read at each of a few offsets of every checkpoint file
MAX_CACHED_KEYS = 16  # program directories kept in a root, most recently used first (each holds weights)


class CompileCache:
    def __init__(self, root: str | Path | None, key_fields: dict):
        self.key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:24]
        self.temporary = None
        self.root = writable_dir(Path(root).expanduser()) if root else None
        if self.root is None:
            self.temporary = tempfile.TemporaryDirectory(prefix="fdkit-compiled-")
            self.root = Path(self.temporary.name)
        self.dir = self.root / self.key
        self.was_hit = False

    def load(self, names: Iterable[str], make: Callable[[Path, Path], object]) -> dict | None:
        """`make(model_file, params_file)` of each program from the cache; None if any is missing or fails
        to load (the directory is then removed)."""
        names = list(names)
        if not all(_is_whole(*self.files(self.dir, name)) for name in names):
            return None
        try:
            loaded = {name: make(*self.files(self.dir, name)) for name in names}
        except Exception as exc:  # a corrupt file: compile again
            logger.warning("compile cache %s does not load (%s): compiling again", self.dir, exc)
            shutil.rmtree(self.dir, ignore_errors=True)
            return None
        self.was_hit = True
        with contextlib.suppress(OSError):
            os.utime(self.dir)  # used: kept by _prune
        return loaded

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A directory to save programs in; committed if the block ends normally, else removed."""
        folder = Path(tempfile.mkdtemp(prefix=f".{self.key}-", dir=self.root))
        try:
            yield folder
            self._commit(folder)
            self._prune()
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _commit(self, folder: Path) -> None:
        if self.dir.exists() and not self._is_complete(folder):
            shutil.rmtree(self.dir, ignore_errors=True)  # incomplete: replaced
        with contextlib.suppress(OSError):  # another engine committed the same programs first
            folder.rename(self.dir)

    def _prune(self) -> None:
        """Removes all but the MAX_CACHED_KEYS most recently used program directories of the root (named
        by a key; nothing else in it is touched). Every fdkit or paddle upgrade, checkpoint and dtype
        adds one, with a copy of the weights: unpruned, a day's development filled a 100 GB disk."""
        dirs = [path for path in self.root.iterdir() if path.is_dir() and _is_key(path.name)]
        for old in sorted(dirs, key=_mtime, reverse=True)[MAX_CACHED_KEYS:]:
            shutil.rmtree(old, ignore_errors=True)

    def _is_complete(self, folder: Path) -> bool:
        """Whether the committed directory has every program `folder` has."""
        return all((self.dir / path.name).is_file() for path in folder.iterdir())

    @staticmethod
    def files(folder: Path, name: str) -> tuple[Path, Path]:
        return folder / f"{name}.json", folder / f"{name}.pdiparams"

    def close(self) -> None:
        """Removes a temporary cache (loaded predictors keep what they read)."""
        if self.temporary is not None:
            self.temporary.cleanup()


def save_program(folder: Path, name: str, layer: paddle.nn.Layer, input_spec: list) -> None:
    static = paddle.jit.to_static(layer, full_graph=True)
    paddle.jit.save(static, str(folder / name), input_spec=input_spec)


def writable_dir(root: Path) -> Path | None:
    """`root`, created if need be, or None (with a warning) where it cannot be written."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=root).close()
    except OSError as exc:
        logger.warning("%s is not writable (%s): what is compiled there is not kept", root, exc)
        return None
    return root


def _is_key(name: str) -> bool:
    return len(name) == 24 and all(c in "0123456789abcdef" for c in name)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # removed by another engine meanwhile
        return 0.0


def _is_whole(*paths: Path) -> bool:
    return all(path.is_file() and path.stat().st_size > 0 for path in paths)


def model_signature(model_path: str | Path) -> list:
    """What identifies a checkpoint folder's contents without reading all of it: each file's name, size,
    modification time and a hash of a few blocks spread over it (fine-tunes of one model have the same
    sizes; copies may keep the times)."""
    return [_file_signature(p) for p in sorted(Path(model_path).iterdir()) if p.is_file()]


def _file_signature(path: Path) -> tuple:
    size, digest = path.stat().st_size, hashlib.sha256()
    with path.open("rb") as f:
        for offset in sorted({0, size // 3, 2 * size // 3, max(0, size - SAMPLE_BYTES)}):
            f.seek(offset)
            digest.update(f.read(SAMPLE_BYTES))
    return path.name, size, path.stat().st_mtime_ns, digest.hexdigest()


def source_signature() -> str:
    """A hash of fdkit's source and paddle's build: changed code, new programs."""
    digest = hashlib.sha256(paddle.version.commit.encode())
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()
