"""Shared test settings (importable from every test: pyproject puts tests/ on pytest's pythonpath)."""

# Small engines for tests: a few MiB of KV cache instead of the default budget.
TEST_ENGINE = dict(num_kv_blocks=64, block_size=16, max_model_len=512, max_num_seqs=16, show_progress=False)
