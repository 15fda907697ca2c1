"""Offline throughput: N requests of `input_len` random tokens, `output_len` new tokens each, all at once.

Prints one JSON object per concurrency; with `--baseline paddleformers`, the same workload through
paddleformers' `generate()` (KV cache on, same threads) on the same checkpoint, and the ratio. With
`--guided json_schema` every request is held to GUIDED_SCHEMA (guided decoding), and the same load
unconstrained runs first as the baseline of `guided_ratio`.
"""

from __future__ import annotations

import json
import resource
import statistics
import time
from typing import Any

import numpy as np

# Nested objects in a long array, enums, bounded strings and integers: the mask changes its shape at
# nearly every token, and the array cannot close within the output (minItems), so the load is the
# unconstrained one's: every request writes all its tokens.
GUIDED_SCHEMA = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 0, "maximum": 100000},
                    "name": {"type": "string", "maxLength": 12},
                    "kind": {"enum": ["book", "film", "song", "game"]},
                    "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 4},
                },
                "required": ["id", "name", "kind", "tags"],
                "additionalProperties": False,
            },
            "minItems": 64,
        }
    },
    "required": ["items"],
    "additionalProperties": False,
}


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="per rank; 0 shares the cores among ranks")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks")
    parser.add_argument(
        "--expert-parallel", action="store_true", help="MoE, --tp > 1: each rank holds whole experts"
    )
    parser.add_argument("--kv-cache-gib", type=float, default=2.0)
    parser.add_argument("--baseline", choices=["none", "paddleformers"], default="none")
    parser.add_argument(
        "--guided", choices=["none", "json_schema"], default="none", help="hold outputs to GUIDED_SCHEMA"
    )
    parser.add_argument(
        "overrides", nargs="*", help="config overrides, e.g. engine.dtype=bfloat16 engine.compile=false"
    )
    parser.set_defaults(run=run)


def make_prompts(num: int, input_len: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(3, vocab_size, size=(num, input_len)).tolist()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def guided_decoding(kind: str):
    """The constraint of a `--guided` load (None: none)."""
    if kind == "none":
        return None
    from fdkit.engine.sequence import GuidedDecoding
    from fdkit.serving.guided import json_schema_grammar

    return GuidedDecoding(json_schema_grammar(GUIDED_SCHEMA))


def bench_fdkit(llm, prompts: list[list[int]], output_len: int, guided=None) -> dict:
    from fdkit import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True, guided_decoding=guided)
    warm_up = SamplingParams(temperature=0, max_tokens=4, guided_decoding=guided)
    llm.generate(prompts, warm_up, use_tqdm=False)  # the batch's shapes, before the clock starts
    request_ids = [llm.add_request(p, params) for p in prompts]
    num_tokens = dict.fromkeys(request_ids, 0)
    first_token: dict[str, float] = {}
    decode_times: list[float] = []
    start = time.perf_counter()
    while llm.has_unfinished_requests():
        step_start = time.perf_counter()
        outputs = llm.step()
        now = time.perf_counter()
        if outputs and all(o.request_id in first_token for o in outputs):  # a decode step
            decode_times.append(now - step_start)
        for output in outputs:
            first_token.setdefault(output.request_id, now - start)
            num_tokens[output.request_id] = len(output.token_ids)  # a grammar may end a request early
    elapsed = time.perf_counter() - start
    ttfts = [first_token[r] for r in request_ids]
    return {
        "output_tokens_per_s": round(sum(num_tokens.values()) / elapsed, 2),
        "num_output_tokens": sum(num_tokens.values()),
        "ttft_ms_median": round(statistics.median(ttfts) * 1000, 1),
        "ttft_ms_max": round(max(ttfts) * 1000, 1),
        "decode_step_ms_median": round(statistics.median(decode_times) * 1000, 2),
        "elapsed_s": round(elapsed, 2),
        "peak_rss_mib": round(peak_rss_mib()),
        **rank_rss(llm),
    }


def rank_rss(llm) -> dict:
    """Resident memory of each tensor-parallel rank process, now (they hold the weights)."""
    import psutil

    pids = getattr(llm, "rank_pids", None)
    return (
        {"rank_rss_mib": [round(psutil.Process(pid).memory_info().rss / 2**20) for pid in pids]}
        if pids
        else {}
    )


def load_paddleformers(model_dir: str) -> Any:
    from paddleformers.transformers import Ernie4_5Config, Ernie4_5ForCausalLM
    from paddleformers.utils.log import logger

    logger.set_level("ERROR")
    config = Ernie4_5Config.from_pretrained(model_dir)
    config.fuse_rms_norm = False  # no CPU kernel for the fused norm
    model = Ernie4_5ForCausalLM.from_pretrained(model_dir, config=config, dtype="float32")
    model.eval()
    return model


def bench_paddleformers(model, prompts: list[list[int]], output_len: int) -> dict:
    import paddle

    with paddle.no_grad():
        ids = paddle.to_tensor(prompts, dtype="int64")
        model.generate(input_ids=ids[:1], max_new_tokens=4, decode_strategy="greedy_search", use_cache=True)
        start = time.perf_counter()
        out, _ = model.generate(
            input_ids=ids,
            max_new_tokens=output_len,
            min_new_tokens=output_len,
            decode_strategy="greedy_search",
            use_cache=True,
        )
        elapsed = time.perf_counter() - start
    return {
        "output_tokens_per_s": round(out.size / elapsed, 2),
        "elapsed_s": round(elapsed, 2),
        "peak_rss_mib": round(peak_rss_mib()),
    }


def run(args) -> None:
    from fdkit import LLM

    levels = [int(c) for c in args.concurrency.split(",")]
    engine = {
        "threads": args.threads,
        "kv_cache_gib": args.kv_cache_gib,
        "max_num_seqs": max(levels),
        "max_model_len": max(args.input_len + args.output_len, 256),
        "expert_parallel": args.expert_parallel,
    }
    llm = LLM.from_config(
        [
            "model=ernie",
            f"model.path={args.model}",
            f"tp={args.tp}",
            *[f"engine.{k}={v}" for k, v in engine.items()],
            *args.overrides,
        ]
    )
    vocab = min(llm.tokenizer.vocab_size, llm.vocab_size)
    baseline = load_paddleformers(args.model) if args.baseline == "paddleformers" else None
    for concurrency in levels:
        prompts = make_prompts(concurrency, args.input_len, vocab)
        result = {
            "engine": "fdkit",
            "tp": args.tp,
            "overrides": args.overrides,
            "expert_parallel": args.expert_parallel,
            "concurrency": concurrency,
            "input_len": args.input_len,
            "output_len": args.output_len,
        }
        guided = guided_decoding(args.guided)
        if guided is not None:
            result["unconstrained"] = bench_fdkit(llm, prompts, args.output_len)
        result.update(guided=args.guided, **bench_fdkit(llm, prompts, args.output_len, guided))
        if guided is not None:
            ratio = result["output_tokens_per_s"] / result["unconstrained"]["output_tokens_per_s"]
            result["guided_ratio"] = round(ratio, 3)
        if baseline is not None:
            base = bench_paddleformers(baseline, prompts, args.output_len)
            result["baseline"] = {"engine": "paddleformers", **base}
            result["speedup"] = round(result["output_tokens_per_s"] / base["output_tokens_per_s"], 2)
        print(json.dumps(result), flush=True)
    llm.close()
