"""Shared test settings (importable from every test: pyproject puts tests/ on pytest's pythonpath)."""

import tempfile
from pathlib import Path

# Small engines for tests: a few MiB of KV cache instead of the default budget.
# compiled programs in one folder of the temp dir shared by the session (not the user's ~/.cache)
TEST_COMPILE_CACHE = str(Path(tempfile.gettempdir()) / "fdkit-test-compiled")
TEST_ENGINE = dict(
    num_kv_blocks=64,
    block_size=16,
    max_model_len=512,
    max_num_seqs=16,
    show_progress=False,
    compile_cache_dir=TEST_COMPILE_CACHE,
)
