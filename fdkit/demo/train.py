"""Trains the demo model: `python -m fdkit.demo.train OUT [--minutes 18] [--seed 0]`.

A small ERNIE 4.5 (fdkit's own model class, run without a KV cache) learns the arithmetic task of
`fdkit.demo.arithmetic` from seeded, generated data for `--minutes`, then is written in the published
`-Paddle` layout (bf16) with its SentencePiece tokenizer and a chat template that honours
`enable_thinking`. Its greedy accuracy on held-out problems, thinking on and off, is printed; OUT appears
only once all of this has succeeded.
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
from fdkit.demo.arithmetic import Problem, held_out_problems, random_problem
from fdkit.models import ernie4_5
from fdkit.models.layers import AttentionBatch
from fdkit.tiny import MESSAGES_TEMPLATE, model_config, tokenizer_files, train_tokenizer
from fdkit.tokenizer import Tokenizer

# Thinking on (the default) opens the think block in the prompt; off closes an empty one, as ERNIE's
# thinking models do.
CHAT_TEMPLATE = MESSAGES_TEMPLATE + (
    "{%- if add_generation_prompt is not defined or add_generation_prompt -%}"
    "{%- if enable_thinking is defined and not enable_thinking -%}"
    "{{- 'Assistant: <think>\n\n</think>\n\n' -}}"
    "{%- else -%}{{- 'Assistant: <think>\n' -}}{%- endif -%}{%- endif -%}"
)
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
EVAL_SEED = 10_000


def tokenizer_corpus(seed: int, num: int = 4000) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(num):
        problem = random_problem(rng)
        lines += [f"User: {problem.question}", f"Assistant: {problem.completion(thinking=True)}"]
    return lines


def build_tokenizer(folder: Path, seed: int) -> Tokenizer:
    sp = train_tokenizer(folder, 400, seed, lines=tokenizer_corpus(seed), split_digits=True)
    tokenizer_files(folder, sp, chat_template=CHAT_TEMPLATE, generation=GENERATION_CONFIG)
    return Tokenizer(folder)


def encode_example(tokenizer, problem: Problem, thinking: bool) -> tuple[list[int], int]:
    """Token ids of prompt + completion + EOS, and where the completion starts (the loss covers it)."""
    messages = [{"role": "user", "content": problem.question}]
    prompt = tokenizer.encode(tokenizer.apply_chat_template(messages, enable_thinking=thinking))
    completion = tokenizer.encode(problem.completion(thinking)) + [tokenizer.eos_token_id]
    return prompt + completion, len(prompt)


def training_batches(seed: int, batch_size: int) -> Iterator[tuple[list[Problem], list[bool]]]:
    """The training stream: (problems, thinking flags) per step, the same for a seed every time."""
    rng = random.Random(seed)
    while True:
        problems = [random_problem(rng) for _ in range(batch_size)]
        yield problems, [rng.random() < 0.75 for _ in problems]


def training_set(seed: int, steps: int, batch_size: int) -> set[tuple[int, str, int]]:
    """Every (a, op, b) a finished training run saw (replayed from its seed and step count)."""
    batches = training_batches(seed, batch_size)
    return {(p.a, p.op, p.b) for _ in range(steps) for p in next(batches)[0]}


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


def train(out: Path, minutes: float, seed: int, batch_size: int = 48, lr: float = 2e-3) -> dict:
    """Trains for `minutes` and writes the model, its tokenizer and training.json into `out`."""
    from fdkit.engine.model_runner import configure_runtime, no_strided_views

    configure_runtime("cpu", 0)
    paddle.seed(seed)
    tokenizer = build_tokenizer(out, seed)
    vocab_size = -(-tokenizer.vocab_size // 64) * 64
    raw_config = model_config({**ARCH, "vocab_size": vocab_size}, "paddle")
    model = ernie4_5.MODEL_CLASS(
        ernie4_5.CONFIG_CLASS.from_dict(raw_config), max_position=ARCH["max_position_embeddings"]
    )
    init_weights(model, seed)
    optimizer = paddle.optimizer.AdamW(
        learning_rate=lr,
        parameters=model.parameters(),
        weight_decay=0.01,
        grad_clip=paddle.nn.ClipGradByGlobalNorm(1.0),
    )
    batches, start, step, losses, seen = training_batches(seed, batch_size), time.time(), 0, [], set()
    budget = minutes * 60
    while time.time() - start < budget:
        problems, thinking = next(batches)
        seen.update((p.a, p.op, p.b) for p in problems)
        examples = [encode_example(tokenizer, p, t) for p, t in zip(problems, thinking, strict=True)]
        ids, targets = make_batch(examples)
        progress = (time.time() - start) / budget
        optimizer.set_lr(
            lr * min(1.0, (step + 1) / 100) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))
        )
        with no_strided_views():
            logits = forward_all(model, ids)
            loss = F.cross_entropy(
                logits.reshape([-1, vocab_size]),
                paddle.to_tensor(targets.reshape([-1, 1])),
                ignore_index=-100,
            )
            loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        losses.append(float(loss))
        step += 1
        if step % 50 == 0:
            print(
                json.dumps(
                    {
                        "step": step,
                        "loss": round(sum(losses[-50:]) / 50, 4),
                        "minutes": round((time.time() - start) / 60, 2),
                    }
                ),
                flush=True,
            )
    save(model, raw_config, out)
    (out / "training.json").write_text(
        json.dumps(
            {
                "seed": seed,
                "steps": step,
                "batch_size": batch_size,
                "minutes": round((time.time() - start) / 60, 2),
                "final_loss": round(sum(losses[-50:]) / 50, 4),
            }
        )
    )
    return {"steps": step, "seen": seen}


def forward_all(model, ids: np.ndarray) -> paddle.Tensor:
    """Logits at every position of every row: the model run without a KV cache."""
    rows, length = ids.shape
    batch = AttentionBatch.causal(rows, length, last_token_index=paddle.arange(rows * length))
    positions = paddle.to_tensor(np.tile(np.arange(length), rows))
    caches = [(None, None)] * len(model.layers)
    return model(paddle.to_tensor(ids.reshape(-1)), positions, caches, batch)


def save(model, raw_config: dict, out: Path) -> None:
    """The trained parameters in the published `-Paddle` layout, bf16, with config.json."""
    state = {name: param.numpy() for name, param in model.named_parameters()}
    save_checkpoint(out, state, ernie4_5, raw_config, "paddle", ARCH["num_shards"], ARCH["bf16"])


def evaluate(folder: Path, num: int = 200, exclude: set[tuple[int, str, int]] | None = None) -> dict:
    """Greedy accuracy through fdkit's engine, thinking on and off, on held-out problems."""
    from fdkit import LLM, SamplingParams

    problems = held_out_problems(num, EVAL_SEED, exclude)
    greedy = SamplingParams(temperature=0, max_tokens=160)
    result = {}
    with LLM(folder, max_model_len=512, num_kv_blocks=256, block_size=16, show_progress=False) as llm:
        for thinking in (True, False):
            outputs = llm.chat(
                [[{"role": "user", "content": p.question}] for p in problems],
                greedy,
                enable_thinking=thinking,
                use_tqdm=False,
            )
            correct = sum(answer_of(o.text) == p.answer for o, p in zip(outputs, problems, strict=True))
            result["thinking_on" if thinking else "thinking_off"] = correct / num
    return result


def answer_of(text: str) -> str:
    return text.split("</think>")[-1].strip()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--minutes", type=float, default=18.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with staged_folder(Path(args.out)) as staging:
        trained = train(staging, args.minutes, args.seed)
        scores = evaluate(staging, exclude=trained["seen"])
        size_bytes = sum(f.stat().st_size for f in staging.iterdir())
        print(json.dumps({"accuracy": scores, "size_bytes": size_bytes}))


if __name__ == "__main__":
    main()
