"""Writes a random-weight ERNIE 4.5 checkpoint in the published format, with its tokenizer.

The tokenizer is a SentencePiece tokenizer.model, or with `--tokenizer json` the same one as a Hugging
Face tokenizer.json (as transformers 5 saves it).

    python -m fdkit.tiny OUT [--preset NAME] [--layout paddle|pt] [--seed N] [--tokenizer sentencepiece|json]

Presets: `tiny`, `tiny-moe` and `tiny-20h` load in well under a second (tests); `0.3b` has
ERNIE-4.5-0.3B's dimensions, `small-moe` ERNIE-4.5-21B-A3B's proportions at a size this machine runs
quickly, and `small-dense` the same active parameters as `small-moe` in a dense model (benchmarks).
The same seed gives the same weights in both layouts, and the same files on every run.
`ensure_checkpoint` writes one only where none is yet.
"""

from __future__ import annotations

import argparse
import io
import json
import random
from pathlib import Path

import numpy as np
import sentencepiece as spm
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from fdkit.checkpoint import parameter_name, save_checkpoint, staged_folder
from fdkit.models import ernie4_5, ernie4_5_moe, model_module

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
PRESETS["tiny-moe"] = {
    **PRESETS["tiny"],
    "num_hidden_layers": 3,
    **dict(moe_num_experts=8, moe_k=2, moe_intermediate_size=32, moe_num_shared_experts=1),
    **dict(moe_layer_start_index=1, moe_layer_end_index=2, moe_layer_interval=1, moe_norm_min=1e-12),
}
# 21B-A3B's proportions (64 experts, 6 per token, 2 shared, the first layer dense, dense width = (k + shared)
# x the experts' width), and an LM head about as heavy, next to the active parameters, as 21B-A3B's.
PRESETS["small-moe"] = {
    **PRESETS["0.3b"],
    **dict(vocab_size=8192, hidden_size=1024, intermediate_size=3072, num_hidden_layers=6),
    **dict(num_attention_heads=8, num_key_value_heads=2, head_dim=128, num_shards=4),
    **dict(moe_num_experts=64, moe_k=6, moe_intermediate_size=384, moe_num_shared_experts=2),
    **dict(moe_layer_start_index=1, moe_layer_end_index=5, moe_layer_interval=1, moe_norm_min=1e-12),
}
# 20 query heads and 4 KV heads, as ERNIE-4.5-21B-A3B: heads that split unevenly over 3 or 8 ranks (tests).
PRESETS["tiny-20h"] = {
    **PRESETS["tiny"],
    **dict(num_attention_heads=20, num_key_value_heads=4, head_dim=8, intermediate_size=192),
}
# small-moe's dense twin: every layer as wide as small-moe's active experts (for step-cost comparisons).
PRESETS["small-dense"] = {k: v for k, v in PRESETS["small-moe"].items() if not k.startswith("moe_")}
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


def random_weights(raw_config: dict, seed: int) -> dict[str, np.ndarray]:
    """Our model's parameters by name, random; scaled so logits are well apart."""
    rng = np.random.default_rng(seed)
    module = model_module(raw_config)
    shapes = module.weight_shapes(module.CONFIG_CLASS.from_dict(raw_config))
    state = {}
    for target, part_shapes in shapes.items():
        parts = [random_part(rng, target, shape) for shape in part_shapes]
        state[parameter_name(module.CHECKPOINT_RULES, target)] = np.concatenate(parts, axis=-1)
    return state


def random_part(rng: np.random.Generator, target: str, shape: tuple[int, ...]) -> np.ndarray:
    noise = rng.standard_normal(shape, dtype=np.float32)
    if len(shape) == 1:  # a norm
        return 1 + 0.1 * noise
    if target.endswith("e_score_correction_bias"):  # about the spread of the routing probabilities
        return noise * (0.5 / shape[-1])
    if target == "embed_tokens":
        return 0.2 * noise
    # The layers' outputs outweigh the embedding: no echo of the last token.
    scale = 4 if target.endswith(("o_proj", "down_proj")) else 1
    return scale * (noise / np.sqrt(shape[0]))


def model_config(cfg: dict, layout: str) -> dict:
    module = _module(cfg)
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
    keys += tuple(key for key in cfg if key.startswith("moe_"))
    return {
        "architectures": [module.LAYOUT_ARCHITECTURES[layout]],
        "model_type": module.MODEL_TYPES[0],
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


def tokenizers_json(sp: spm.SentencePieceProcessor) -> tokenizers.Tokenizer:
    """The same tokenizer as a Hugging Face BPE (what transformers 5 saves as tokenizer.json): the pieces
    as its vocabulary, each piece's merges ranked by the piece's id, bytes by fallback, control and
    user-defined pieces and ADDED_TOKENS as added tokens (the control ones special)."""
    num_pieces = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(num_pieces)}
    merges = []
    for i in range(num_pieces):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.id_to_piece(i) in USER_SYMBOLS:
            continue
        piece = sp.id_to_piece(i)
        pairs = [(piece[:k], piece[k:]) for k in range(1, len(piece))]
        pairs = [(a, b) for a, b in pairs if a in vocab and b in vocab]
        merges += [(i, vocab[a], vocab[b], a, b) for a, b in pairs]
    merges = [(a, b) for *_, a, b in sorted(merges)]
    unk = sp.id_to_piece(sp.unk_id())
    tk = tokenizers.Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=False)
    tk.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    controls = [i for i in range(num_pieces) if sp.is_control(i) or sp.is_unknown(i)]
    tk.add_special_tokens([tokenizers.AddedToken(sp.id_to_piece(i), special=True) for i in controls])
    tk.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False) for t in USER_SYMBOLS])
    tk.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS])
    return tk


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


def write_checkpoint(
    out: str | Path,
    preset: str = "tiny",
    layout: str = "paddle",
    seed: int = 0,
    tokenizer: str = "sentencepiece",
) -> Path:
    """Writes the checkpoint into `out`, replacing what is there (in one rename: never half-written).
    `tokenizer="json"` writes the same tokenizer as tokenizer.json instead of tokenizer.model."""
    _check_choices(preset, layout)
    out = Path(out)
    with staged_folder(out) as staging:
        _write(staging, preset, layout, seed)
        if tokenizer == "json":
            sp = spm.SentencePieceProcessor(model_file=str(staging / "tokenizer.model"))
            tokenizers_json(sp).save(str(staging / "tokenizer.json"))
            (staging / "tokenizer.model").unlink()
    return out


def ensure_checkpoint(path: str | Path, preset: str = "tiny", layout: str = "paddle", seed: int = 0) -> Path:
    """`path`, once it holds a checkpoint: written there if missing. Processes that race each write a
    copy beside it; the first to finish renames its copy into place, the others drop theirs."""
    _check_choices(preset, layout)
    path = Path(path)
    if not (path / "config.json").is_file():
        with staged_folder(path, replace=False) as staging:
            _write(staging, preset, layout, seed)
    if not (path / "config.json").is_file():
        raise FileExistsError(f"{path} exists but holds no checkpoint")
    return path


def _module(cfg: dict):
    return ernie4_5_moe if "moe_num_experts" in cfg else ernie4_5


def _check_choices(preset: str, layout: str) -> None:
    if preset not in PRESETS or layout not in ernie4_5.LAYOUT_ARCHITECTURES:
        raise ValueError(
            f"preset must be one of {list(PRESETS)} and layout one of {list(ernie4_5.LAYOUT_ARCHITECTURES)}"
        )


def _write(folder: Path, preset: str, layout: str, seed: int) -> None:
    cfg = PRESETS[preset]
    sp = train_tokenizer(folder, cfg["tokenizer_vocab"], seed)
    assert sp.get_piece_size() + len(ADDED_TOKENS) <= cfg["vocab_size"]
    tokenizer_files(folder, sp)
    raw_config = model_config(cfg, layout)
    state = random_weights(raw_config, seed)
    save_checkpoint(folder, state, _module(cfg), raw_config, layout, cfg["num_shards"], cfg["bf16"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--preset", choices=list(PRESETS), default="tiny")
    parser.add_argument("--layout", choices=list(ernie4_5.LAYOUT_ARCHITECTURES), default="paddle")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", choices=["sentencepiece", "json"], default="sentencepiece")
    args = parser.parse_args(argv)
    print(write_checkpoint(args.out, args.preset, args.layout, args.seed, args.tokenizer))


if __name__ == "__main__":
    main()
