"""Writes a random-weight ERNIE 4.5 checkpoint in the published format, with a SentencePiece tokenizer.

    python -m fdkit.tiny OUT [--preset tiny|0.3b] [--layout paddle|pt] [--seed N]

`tiny` loads in well under a second (tests); `0.3b` has ERNIE-4.5-0.3B's dimensions (benchmarks).
The same seed gives the same weights in both layouts, and the same files on every run.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import sentencepiece as spm

from fdkit.checkpoint import INDEX_FILE, save_safetensors

PRESETS = {
    "tiny": dict(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tokenizer_vocab=900,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        num_shards=2,
        bf16=False,
    ),
    "0.3b": dict(
        vocab_size=103424,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=18,
        num_attention_heads=16,
        num_key_value_heads=2,
        head_dim=128,
        tokenizer_vocab=8000,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        num_shards=2,
        bf16=True,
    ),
}
# ERNIE 4.5's named special tokens (tokenizer_config.json of the published models).
SPECIAL_TOKENS = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": "<unk>",
    "cls_token": "<|begin_of_sentence|>",
    "sep_token": "<|end_of_sentence|>",
    "mask_token": "<mask:1>",
}
USER_SYMBOLS = ["<|begin_of_sentence|>", "<|end_of_sentence|>", *[f"<mask:{i}>" for i in range(8)]]
# Atomic but not special (they stay in decoded text, where the reasoning parser finds them); their ids
# follow SentencePiece's own, as in added_tokens.json.
ADDED_TOKENS = ["<think>", "</think>"]
# ERNIE 4.5's conversation format; CHAT_TEMPLATE adds its generation prompt.
MESSAGES_TEMPLATE = (
    "{{- cls_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{- 'User: ' + message['content'] + '\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- 'Assistant: ' + message['content'] + sep_token -}}"
    "{%- elif message['role'] == 'system' -%}{{- message['content'] + '\n' -}}"
    "{%- endif -%}{%- endfor -%}"
)
CHAT_TEMPLATE = (
    MESSAGES_TEMPLATE + "{%- if add_generation_prompt is not defined or add_generation_prompt -%}"
    "{{- 'Assistant: ' -}}{%- endif -%}"
)
WORDS = (
    "the a of and to in is you that it he was for on are as with his they at be this have from or one "
    "had by word but not what all were we when your can said there use an each which she do how their if "
    "will up other about out many then them these so some her would make like him into time has look two "
    "more write go see number no way could people my than first water been call who oil its now find long "
    "down day did get come made may part hello world model answer think reason step question Paddle ERNIE"
).split()
HANZI = "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长知民样现分将外但身些与高意进把法此实回二理美点月明其种声全工己话儿者向情部正名定女问力机给等几很业最间新什打便位因重被走电四第门相次东政海口使教西再平真听世气信北少关并内加化由却代军产入先山五太水万市眼体别处总才场师书比住员九笑性通目华报立马命张活难神数件安表原车白应路期叫死常提感金何更反合放做系计或司利受光王果亲界及今京务制解各任至清物台象记边共风战干接它许八特觉望直服毛林题建南度统色字请交爱让认算论百吃义科怎元社术结六功指思非流每青管夫连远资队跟带花快条院变联言权往展该领传近留红治决周保达办运武半候七必城父强步完革深区即求品士转量空甚众技轻程告江语英基派满式李息写呢识极令黄德收脸钱党倒未持取设始版双历越史商千片容研像找友孩站广改议形委早房音火际则首单据导影失拿网香似斯专石若兵弟谁校读志飞观争究包组造落视济喜离虽坏兴切具"  # noqa: E501


def corpus_lines(seed: int, num_lines: int = 6000) -> list[str]:
    """Mixed English / Chinese / number text with the special tokens, for training the tokenizer."""
    rng = random.Random(seed)
    lines = []
    for i in range(num_lines):
        english = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
        chinese = "".join(rng.choice(HANZI) for _ in range(rng.randint(2, 16)))
        number = f"{rng.randint(0, 9999)}{rng.choice('+-*=')}{rng.randint(0, 9999)}"
        parts = [english.capitalize() + rng.choice(".?!"), chinese + rng.choice("。？！，"), number]
        rng.shuffle(parts)
        if i % 5 == 0:
            parts = ["<|begin_of_sentence|>User: ", *parts, "\nAssistant: <think>", english, "</think>"]
        lines.append(" ".join(parts))
    return lines


def train_tokenizer(
    out: Path, vocab_size: int, seed: int, lines: list[str] | None = None, split_digits: bool = False
) -> spm.SentencePieceProcessor:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines if lines is not None else corpus_lines(seed)),
        split_digits=split_digits,
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=0.9995,
        byte_fallback=True,
        hard_vocab_limit=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        user_defined_symbols=USER_SYMBOLS,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(model.getvalue())
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def random_weights(cfg: dict, seed: int) -> dict[str, np.ndarray]:
    """Weights in Paddle's [in, out] orientation under neutral names; scaled so logits are well apart."""
    rng = np.random.default_rng(seed)
    h, i, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q_out, kv_out = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    normal = lambda *shape: rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[0])  # noqa: E731
    weights = {
        "embed_tokens": 0.2 * rng.standard_normal((cfg["vocab_size"], h), dtype=np.float32),
        "norm": 1 + 0.1 * rng.standard_normal(h, dtype=np.float32),
    }
    if not cfg["tie_word_embeddings"]:
        weights["lm_head"] = rng.standard_normal((cfg["vocab_size"], h), dtype=np.float32) * 0.5
    for n in range(cfg["num_hidden_layers"]):
        weights |= {
            f"{n}.q": normal(h, q_out),
            f"{n}.k": normal(h, kv_out),
            f"{n}.v": normal(h, kv_out),
            f"{n}.o": 4 * normal(q_out, h),
            f"{n}.gate": normal(h, i),
            f"{n}.up": normal(h, i),
            f"{n}.down": 4 * normal(i, h),  # layers outweigh the embedding: no echo of the last token
            f"{n}.input_layernorm": 1 + 0.1 * rng.standard_normal(h, dtype=np.float32),
            f"{n}.post_attention_layernorm": 1 + 0.1 * rng.standard_normal(h, dtype=np.float32),
        }
    return weights


def checkpoint_tensors(weights: dict[str, np.ndarray], cfg: dict, layout: str) -> dict[str, np.ndarray]:
    """Names and orientation of the `-Paddle` layout (fused, [in, out]) or the `-PT` one."""
    prefix = "ernie." if layout == "paddle" else "model."
    out = {f"{prefix}embed_tokens.weight": weights["embed_tokens"], f"{prefix}norm.weight": weights["norm"]}
    if "lm_head" in weights:
        out["lm_head.weight"] = weights["lm_head"].T if layout == "paddle" else weights["lm_head"]
    for n in range(cfg["num_hidden_layers"]):
        w = lambda key: weights[f"{n}.{key}"]  # noqa: E731, B023
        layer = f"{prefix}layers.{n}."
        out[layer + "input_layernorm.weight"] = w("input_layernorm")
        out[layer + "post_attention_layernorm.weight"] = w("post_attention_layernorm")
        if layout == "paddle":
            out[layer + "self_attn.qkv_proj.weight"] = np.concatenate([w("q"), w("k"), w("v")], axis=1)
            out[layer + "self_attn.o_proj.weight"] = w("o")
            out[layer + "mlp.up_gate_proj.weight"] = np.concatenate([w("gate"), w("up")], axis=1)
            out[layer + "mlp.down_proj.weight"] = w("down")
        else:
            for key in ("q", "k", "v", "o"):
                out[layer + f"self_attn.{key}_proj.weight"] = w(key).T
            for key in ("gate", "up", "down"):
                out[layer + f"mlp.{key}_proj.weight"] = w(key).T
    return out


def write_shards(tensors: dict[str, np.ndarray], out: Path, num_shards: int, bf16: bool) -> None:
    names = list(tensors)
    groups = [names[k::num_shards] for k in range(num_shards)] if num_shards > 1 else [names]
    weight_map = {}
    for k, group in enumerate(groups):
        file = (
            f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" if len(groups) > 1 else "model.safetensors"
        )
        save_safetensors({name: tensors[name] for name in group}, out / file, bf16=bf16)
        weight_map |= {name: file for name in group}
    if len(groups) > 1:
        (out / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))


def model_config(cfg: dict, layout: str) -> dict:
    keys = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "tie_word_embeddings",
    )
    return {
        "architectures": ["Ernie4_5_ForCausalLM" if layout == "paddle" else "Ernie4_5ForCausalLM"],
        "model_type": "ernie4_5",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "use_bias": False,
        "use_cache": False,
        "torch_dtype": "bfloat16" if cfg["bf16"] else "float32",
        **{key: cfg[key] for key in keys},
    }


def tokenizer_files(
    out: Path,
    sp: spm.SentencePieceProcessor,
    chat_template: str | None = None,
    generation: dict | None = None,
) -> None:
    added = {token: sp.get_piece_size() + k for k, token in enumerate(ADDED_TOKENS)}
    (out / "added_tokens.json").write_text(json.dumps(added, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS, indent=2))
    config = {
        **SPECIAL_TOKENS,
        "tokenizer_class": "Ernie4_5_Tokenizer",
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": 131072,
        "chat_template": chat_template or CHAT_TEMPLATE,
        "additional_special_tokens": [f"<mask:{i}>" for i in range(8)],
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    generation = generation or {
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "top_p": 0.8,
        "temperature": 0.8,
        "repetition_penalty": 1.0,
        "frequency_penalty": 0.0,
        "presence_penalty": 0.0,
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))


def write_checkpoint(out: str | Path, preset: str = "tiny", layout: str = "paddle", seed: int = 0) -> Path:
    """Writes the checkpoint into `out` (atomically: a half-written folder is never left behind)."""
    if preset not in PRESETS or layout not in ("paddle", "pt"):
        raise ValueError(f"preset must be one of {list(PRESETS)} and layout 'paddle' or 'pt'")
    out, cfg = Path(out), PRESETS[preset]
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        sp = train_tokenizer(staging, cfg["tokenizer_vocab"], seed)
        assert sp.get_piece_size() + len(ADDED_TOKENS) <= cfg["vocab_size"]
        tokenizer_files(staging, sp)
        tensors = checkpoint_tensors(random_weights(cfg, seed), cfg, layout)
        write_shards(tensors, staging, cfg["num_shards"], cfg["bf16"])
        (staging / "config.json").write_text(json.dumps(model_config(cfg, layout), indent=2))
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--preset", choices=list(PRESETS), default="tiny")
    parser.add_argument("--layout", choices=["paddle", "pt"], default="paddle")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_checkpoint(args.out, args.preset, args.layout, args.seed))


if __name__ == "__main__":
    main()
