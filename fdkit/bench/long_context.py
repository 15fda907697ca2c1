"""Long prompts, in-process (tp=1): time to first token and peak RSS of one long prompt; the same long
system prompt twice (prefix caching); decode streams' inter-token times while a long prompt prefills.

Prints one JSON object. Prompts are random token ids (seeded), so only an exact repeat is cached.
"""

from __future__ import annotations

import json
import statistics
import time

import numpy as np

from fdkit.bench.offline import peak_rss_mib


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder")
    parser.add_argument("--scenario", choices=["prompt", "prefix", "stall"], default="prompt")
    parser.add_argument("--input-len", type=int, default=4096, help="tokens of the long prompt")
    parser.add_argument("--output-len", type=int, default=4)
    parser.add_argument("--streams", type=int, default=4, help="stall: decode streams running meanwhile")
    parser.add_argument("--kv-cache-gib", type=float, default=2.0)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--max-decode-stall", type=float, default=None, help="0: off; default: the config's")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. engine.dtype=bfloat16")
    parser.set_defaults(run=run)


def random_ids(num: int, vocab: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, vocab, num).tolist()


def run_until_first_token(llm, request_id: str) -> tuple[float, list[float]]:
    """Steps until `request_id` has a token: its time to first token and every step's duration."""
    start, step_times = time.perf_counter(), []
    while True:
        step_start = time.perf_counter()
        outputs = llm.step()
        step_times.append(time.perf_counter() - step_start)
        if any(o.request_id == request_id and o.token_ids for o in outputs):
            return time.perf_counter() - start, step_times


def one_prompt(llm, args, vocab: int) -> dict:
    from fdkit import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    request_id = llm.add_request(random_ids(args.input_len, vocab, 1), params)
    ttft, _ = run_until_first_token(llm, request_id)
    while llm.has_unfinished_requests():
        llm.step()
    return {"ttft_s": round(ttft, 2)}


def same_prefix_twice(llm, args, vocab: int) -> dict:
    from fdkit import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    system = random_ids(args.input_len, vocab, 1)
    ttfts = []
    for seed in (2, 3):  # the same system prompt, another question
        request_id = llm.add_request(system + random_ids(32, vocab, seed), params)
        ttfts.append(run_until_first_token(llm, request_id)[0])
        while llm.has_unfinished_requests():
            llm.step()
    return {"ttft_first_s": round(ttfts[0], 3), "ttft_second_s": round(ttfts[1], 3),
            "second_over_first": round(ttfts[1] / ttfts[0], 4)}  # fmt: skip


def stall(llm, args, vocab: int) -> dict:
    """Inter-token times of the streams (one token per step each) without and during the prefill.
    The streams decode throughout, so their own context grows by one token per step (~3,000 tokens
    over a 16k prefill), and a decode-only step at the end is slower than at the start: they are timed
    alone before the long prompt and again after it, at their final context."""
    from fdkit import SamplingParams

    streams = SamplingParams(temperature=0, max_tokens=100000, ignore_eos=True)
    stream_ids = [llm.add_request(random_ids(32, vocab, 10 + i), streams) for i in range(args.streams)]
    for _ in range(3):  # their prompts, then a few decode steps to settle
        llm.step()
    before = step_times(llm, 30)
    long_id = llm.add_request(
        random_ids(args.input_len, vocab, 1), SamplingParams(temperature=0, max_tokens=1)
    )
    ttft, during = run_until_first_token(llm, long_id)
    after = step_times(llm, 30)
    for request_id in stream_ids:
        llm.abort(request_id)
    p99 = lambda times: float(np.percentile(times, 99))  # noqa: E731
    ms = lambda seconds: round(seconds * 1000, 1)  # noqa: E731
    return {"streams": args.streams, "itl_p99_alone_ms": ms(p99(before)),
            "itl_median_alone_ms": ms(statistics.median(before)),
            "itl_p99_alone_after_ms": ms(p99(after)),
            "itl_median_alone_after_ms": ms(statistics.median(after)),
            "itl_p99_during_ms": ms(p99(during)), "itl_median_during_ms": ms(statistics.median(during)),
            "p99_ratio": round(p99(during) / p99(before), 2),
            "p99_ratio_at_final_context": round(p99(during) / p99(after), 2),
            "long_prompt_ttft_s": round(ttft, 2), "steps_during": len(during)}  # fmt: skip


def step_times(llm, num_steps: int) -> list[float]:
    times = []
    for _ in range(num_steps):
        start = time.perf_counter()
        llm.step()
        times.append(time.perf_counter() - start)
    return times


def run(args) -> None:
    from fdkit import LLM

    engine = {
        "threads": args.threads,
        "kv_cache_gib": args.kv_cache_gib,
        "max_model_len": args.input_len + 1024,
        **({"max_num_batched_tokens": args.max_num_batched_tokens} if args.max_num_batched_tokens else {}),
        **({"max_decode_stall": args.max_decode_stall} if args.max_decode_stall is not None else {}),
    }
    llm = LLM.from_config(
        [
            "model=ernie",
            f"model.path={args.model}",
            *[f"engine.{k}={v}" for k, v in engine.items()],
            *args.overrides,
        ]
    )
    vocab = min(llm.tokenizer.vocab_size, llm.vocab_size)
    rss_loaded = peak_rss_mib()
    scenario = {"prompt": one_prompt, "prefix": same_prefix_twice, "stall": stall}[args.scenario]
    result = scenario(llm, args, vocab)
    plan = llm.memory_plan
    kv_mib = round(plan.num_kv_blocks * plan.block_bytes / 2**20)
    print(json.dumps({
        "scenario": args.scenario, "input_len": args.input_len, "overrides": args.overrides, **engine,
        **result,
        "peak_rss_mib": round(peak_rss_mib()), "peak_rss_loaded_mib": round(rss_loaded),
        "weights_mib": round(plan.weight_bytes / 2**20), "kv_cache_mib": kv_mib,
    }), flush=True)  # fmt: skip
    llm.close()
