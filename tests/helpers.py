"""Shared test settings and helpers (importable from every test: tests/ is on pytest's pythonpath)."""

import json
import tempfile
from pathlib import Path

import numpy as np

from fdkit import SamplingParams
from fdkit.engine.sequence import Sequence

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


def last_logits(llm, token_ids: list[int]) -> np.ndarray:
    """Logits after the last token of `token_ids`, prefilled in one forward pass."""
    seq = Sequence(token_ids, SamplingParams())
    llm.engine.block_manager.grow(seq, len(token_ids))
    try:
        return llm.engine.runner.forward([seq], [len(token_ids)]).numpy()[0]
    finally:
        llm.engine.block_manager.deallocate(seq)


def batch_logits(llm, prompts: list[list[int]]) -> np.ndarray:
    """One step over several prompts at once (prompt chunks and a one-token row in one batch)."""
    seqs = [Sequence(ids, SamplingParams()) for ids in prompts]
    for seq in seqs:
        llm.engine.block_manager.grow(seq, seq.num_tokens)
    try:
        return llm.engine.runner.forward(seqs, [seq.num_tokens for seq in seqs]).numpy()
    finally:
        for seq in seqs:
            llm.engine.block_manager.deallocate(seq)


def word_level_folder(folder: Path, num_words: int) -> None:
    """A checkpoint folder's tokenizer files as make_random_model.py (the vLLM peer's model) writes them:
    a WordLevel tokenizer.json, one token per word, and chat_template.jinja."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, num_words)}}
    tk = HFTokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tk.add_special_tokens(["<pad>", "<s>", "</s>", "<unk>"])
    tk.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    template = (
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}assistant "
    )
    (folder / "chat_template.jinja").write_text(template)
