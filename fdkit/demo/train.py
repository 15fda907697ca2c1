"""Trains the demo model: `python -m fdkit.demo.train OUT [--cpu-minutes 36] [--seed 0] [--arch ...]`.

A small ERNIE 4.5 (fdkit's own model class, run without a KV cache) learns the conversations of
`fdkit.demo.dialogs` (sums and differences worked out digit by digit, products handed to a `multiply`
tool) from seeded, generated data, in batches of examples of similar length, until it has used
`--cpu-minutes` of CPU time (user + sys: the same work on a shared machine as on an idle one). It is then
written in the published `-Paddle` layout (bf16) with its SentencePiece tokenizer and chat template; its
greedy accuracy on held-out problems (`fdkit.demo.evaluate`, over the engine) is printed. OUT appears only
once it is whole.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import paddle
import paddle.nn.functional as F

from fdkit.checkpoint import save_checkpoint, staged_folder
from fdkit.demo.dialogs import ADDED_TOKENS, CHAT_TEMPLATE, Dialog, random_dialog, training_chunks
from fdkit.models import ernie4_5
from fdkit.models.layers import AttentionBatch
from fdkit.tiny import model_config, tokenizer_files, train_tokenizer
from fdkit.tokenizer import Tokenizer

GENERATION_CONFIG = {
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "do_sample": False,
    "temperature": 0.0,
    "top_p": 1.0,
}
ARCH = dict(
    hidden_size=192,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    bf16=True,
    num_shards=1,
)


def render(tokenizer: Tokenizer | None, dialog: Dialog) -> str:
    """The prompt of a dialog, through the chat template (jinja's own when no tokenizer exists yet)."""
    kwargs = {"enable_thinking": dialog.thinking, "tools": dialog.tools}
    if tokenizer is not None:
        return tokenizer.apply_chat_template(dialog.messages, **kwargs)
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(CHAT_TEMPLATE).render(
        messages=dialog.messages, add_generation_prompt=True, **kwargs
    )


def tokenizer_corpus(seed: int, num: int = 4000) -> list[str]:
    """Whole conversations without the atomic tokens (SentencePiece never sees those)."""
    rng, lines = random.Random(seed), []
    for _ in range(num):
        dialog = random_dialog(rng)
        text = render(None, dialog) + dialog.completion
        for token in ADDED_TOKENS:
            text = text.replace(token, "\n")
        lines += [line for line in text.split("\n") if line]
    return lines


def build_tokenizer(folder: Path, seed: int) -> Tokenizer:
    sp = train_tokenizer(folder, 400, seed, lines=tokenizer_corpus(seed), split_digits=True)
    tokenizer_files(folder, sp, chat_template=CHAT_TEMPLATE, generation=GENERATION_CONFIG)
    added = {token: sp.get_piece_size() + k for k, token in enumerate(ADDED_TOKENS)}
    (folder / "added_tokens.json").write_text(json.dumps(added, indent=2))
    return Tokenizer(folder)


def encode_example(tokenizer: Tokenizer, dialog: Dialog) -> tuple[list[int], int]:
    """Token ids of prompt + completion + EOS, and where the completion starts (the loss covers it)."""
    prompt = tokenizer.encode(render(tokenizer, dialog))
    completion = tokenizer.encode(dialog.completion) + [tokenizer.eos_token_id]
    return prompt + completion, len(prompt)


def training_batches(
    tokenizer: Tokenizer, seed: int, batch_size: int
) -> Iterator[list[tuple[list[int], int]]]:
    """Encoded batches of similar length (little padding), in a seeded random order."""
    rng = random.Random(seed + 1)
    for chunk in training_chunks(seed, batch_size):
        examples = sorted((encode_example(tokenizer, d) for d in chunk), key=lambda e: len(e[0]))
        batches = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
        rng.shuffle(batches)
        yield from batches


def make_batch(examples: list[tuple[list[int], int]]) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ids and targets (-100 where no loss) of a batch."""
    length = max(len(ids) for ids, _ in examples)
    ids = np.zeros((len(examples), length), dtype=np.int64)
    targets = np.full((len(examples), length), -100, dtype=np.int64)
    for row, (tokens, start) in enumerate(examples):
        ids[row, : len(tokens)] = tokens
        targets[row, start - 1 : len(tokens) - 1] = tokens[start:]
    return ids, targets


def init_weights(model, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            value = np.ones(param.shape, dtype=np.float32)
        else:
            fan_in = param.shape[0] if "embed" not in name else param.shape[1]
            value = rng.standard_normal(param.shape).astype(np.float32) / math.sqrt(fan_in)
        param.set_value(paddle.to_tensor(value))


def build_model(tokenizer: Tokenizer, arch: dict, seed: int):
    vocab_size = -(-tokenizer.vocab_size // 64) * 64
    raw_config = model_config({**arch, "vocab_size": vocab_size}, "paddle")
    config = ernie4_5.CONFIG_CLASS.from_dict(raw_config)
    model = ernie4_5.MODEL_CLASS(config, max_position=arch["max_position_embeddings"])
    init_weights(model, seed)
    return model, raw_config


def train_step(model, optimizer, ids: np.ndarray, targets: np.ndarray) -> float:
    from fdkit.engine.model_runner import no_strided_views

    with no_strided_views():
        logits = forward_all(model, ids)
        loss = F.cross_entropy(
            logits.reshape([-1, logits.shape[-1]]),
            paddle.to_tensor(targets.reshape([-1, 1])),
            ignore_index=-100,
        )
        loss.backward()
    optimizer.step()
    optimizer.clear_grad()
    return float(loss)


def learning_rate(lr: float, step: int, progress: float) -> float:
    """Warm-up over 100 steps, then a cosine down to 5% of `lr` at the end of the time budget."""
    return (
        lr * min(1.0, (step + 1) / 100) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
    )


def train(
    out: Path, cpu_minutes: float, seed: int, arch: dict, batch_size: int = 48, lr: float = 2e-3
) -> dict:
    """Trains until the process has used `cpu_minutes` of CPU time (user + sys, all threads: the same
    amount of work on a busy machine as on an idle one) and writes the model, its tokenizer and
    training.json into `out`."""
    from fdkit.engine.model_runner import configure_runtime

    configure_runtime("cpu", 0)
    paddle.seed(seed)
    tokenizer = build_tokenizer(out, seed)
    model, raw_config = build_model(tokenizer, arch, seed)
    optimizer = paddle.optimizer.AdamW(
        learning_rate=lr,
        parameters=model.parameters(),
        weight_decay=0.01,
        grad_clip=paddle.nn.ClipGradByGlobalNorm(1.0),
    )
    batches, start, step, losses = training_batches(tokenizer, seed, batch_size), time.time(), 0, []
    budget, cpu_start = cpu_minutes * 60, time.process_time()
    while (used := time.process_time() - cpu_start) < budget:
        optimizer.set_lr(learning_rate(lr, step, used / budget))
        ids, targets = make_batch(next(batches))
        losses.append(train_step(model, optimizer, ids, targets))
        step += 1
        if step % 50 == 0:
            report = {
                "step": step,
                "loss": round(sum(losses[-50:]) / 50, 4),
                "cpu_minutes": round(used / 60, 2),
            }
            print(json.dumps({**report, "minutes": round((time.time() - start) / 60, 2)}), flush=True)
    save(model, raw_config, out, arch)
    info = {"seed": seed, "steps": step, "batch_size": batch_size, "lr": lr}
    info |= {"cpu_minutes": round((time.process_time() - cpu_start) / 60, 2)}
    info |= {"minutes": round((time.time() - start) / 60, 2)}
    info["final_loss"] = round(sum(losses[-50:]) / max(1, len(losses[-50:])), 4)
    (out / "training.json").write_text(json.dumps(info))
    return info


def forward_all(model, ids: np.ndarray) -> paddle.Tensor:
    """Logits at every position of every row: the model run without a KV cache."""
    rows, length = ids.shape
    batch = AttentionBatch.causal(rows, length, last_token_index=paddle.arange(rows * length))
    positions = paddle.to_tensor(np.tile(np.arange(length), rows))
    caches = [(None, None)] * len(model.layers)
    return model(paddle.to_tensor(ids.reshape(-1)), positions, caches, batch)


def save(model, raw_config: dict, out: Path, arch: dict) -> None:
    """The trained parameters in the published `-Paddle` layout, bf16, with config.json."""
    state = {name: param.numpy() for name, param in model.named_parameters()}
    save_checkpoint(out, state, ernie4_5, raw_config, "paddle", arch["num_shards"], arch["bf16"])


def parse_arch(text: str) -> dict:
    """`hidden_size=256,num_hidden_layers=6` on top of ARCH."""
    changes = dict(item.split("=", 1) for item in text.split(",") if item)
    return {**ARCH, **{k: int(v) for k, v in changes.items()}}


def main(argv: list[str] | None = None) -> None:
    from fdkit.demo.evaluate import evaluate_engine

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--cpu-minutes", type=float, default=36.0, help="CPU time to train for (user + sys)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arch", default="", help="changes to ARCH, e.g. num_hidden_layers=6")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=48)
    args = parser.parse_args(argv)
    with staged_folder(Path(args.out)) as staging:
        info = train(staging, args.cpu_minutes, args.seed, parse_arch(args.arch), args.batch_size, args.lr)
    size_bytes = sum(f.stat().st_size for f in Path(args.out).iterdir())
    print(json.dumps({"accuracy": evaluate_engine(Path(args.out)), "size_bytes": size_bytes, **info}))


if __name__ == "__main__":
    main()
