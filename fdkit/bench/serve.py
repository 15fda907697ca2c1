"""Serving benchmark against any OpenAI-compatible server (fdkit, FastDeploy, vLLM).

Each level sends `num_prompts` streamed chat requests, at most `concurrency` at a time, each with a
32-word prompt and `max_tokens` tokens to generate (ignore_eos where the server honours it). Tokens are
timed by `continuous_usage_stats` where the server has it (so tokens without visible text count too), else
by content deltas. Prints one JSON object per level: output tokens/s, time to first token and inter-token
latency (median, p99), errors. `--response-format json_schema` holds every answer to the offline
benchmark's GUIDED_SCHEMA (structured output).
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time

WORDS = (
    "the model answers every question about paddle ernie serving tokens batching cache memory "
    "latency throughput request stream server client prompt"
).split()


def add_arguments(parser) -> None:
    parser.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8188")
    parser.add_argument("--model", default=None, help="model name to send (default: the server's first)")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--num-prompts", type=int, default=0, help="per level (default: 2 x concurrency)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-words", type=int, default=32)
    parser.add_argument("--api-key", default="null")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--response-format", choices=["text", "json_schema"], default="text")
    parser.set_defaults(run=run)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


async def one_request(client, url: str, headers: dict, body: dict) -> dict:
    start = time.perf_counter()
    token_times: list[float] = []
    num_tokens = 0
    async with client.stream("POST", url, json=body, headers=headers) as response:
        if response.status_code != 200:
            return {"error": f"HTTP {response.status_code}"}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"error": chunk["error"].get("message", "error")}
            usage = chunk.get("usage")
            if usage:  # continuous usage stats: a token arrived when the count grew
                now = time.perf_counter()
                token_times += [now] * (usage["completion_tokens"] - num_tokens)
                num_tokens = usage["completion_tokens"]
                continue
            delta = chunk["choices"][0].get("delta", {}) if chunk.get("choices") else {}
            if delta.get("content") or delta.get("reasoning_content"):  # servers without usage stats
                token_times.append(time.perf_counter())
    if not token_times:
        return {"error": "no tokens"}
    gaps = [b - a for a, b in zip(token_times, token_times[1:], strict=False)]
    return {
        "ttft": token_times[0] - start,
        "gaps": gaps,
        "num_tokens": num_tokens or len(token_times),
        "latency": time.perf_counter() - start,
    }


def response_format(kind: str) -> dict:
    if kind == "text":
        return {}
    from fdkit.bench.offline import GUIDED_SCHEMA

    schema = {"name": "items", "schema": GUIDED_SCHEMA, "strict": True}
    return {"response_format": {"type": "json_schema", "json_schema": schema}}


async def run_level(args, model: str, concurrency: int) -> dict:
    import httpx

    url = args.base_url.rstrip("/") + "/v1/chat/completions"
    headers = {"Authorization": f"Bearer {args.api_key}"}
    rng = random.Random(concurrency)
    num_prompts = args.num_prompts or 2 * concurrency
    semaphore = asyncio.Semaphore(concurrency)

    async def task(client):
        prompt = " ".join(rng.choice(WORDS) for _ in range(args.prompt_words))
        body = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": args.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "ignore_eos": True,
            "temperature": 0,
            **response_format(args.response_format),
        }
        async with semaphore:
            try:
                return await one_request(client, url, headers, body)
            except Exception as exc:  # count it, keep measuring
                return {"error": f"{type(exc).__name__}: {exc}"}

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(task(client) for _ in range(num_prompts)))
        elapsed = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    ttfts = [r["ttft"] * 1000 for r in ok]
    gaps = [g * 1000 for r in ok for g in r["gaps"]]
    return {
        "concurrency": concurrency,
        "num_prompts": num_prompts,
        "max_tokens": args.max_tokens,
        "output_tokens_per_s": round(sum(r["num_tokens"] for r in ok) / elapsed, 2),
        "ttft_ms_median": round(statistics.median(ttfts), 1) if ttfts else None,
        "ttft_ms_p99": round(percentile(ttfts, 99), 1) if ttfts else None,
        "itl_ms_median": round(statistics.median(gaps), 1) if gaps else None,
        "itl_ms_p99": round(percentile(gaps, 99), 1) if gaps else None,
        "errors": len(results) - len(ok),
        "error_samples": sorted({r["error"] for r in results if "error" in r})[:3],
        "elapsed_s": round(elapsed, 2),
    }


def run(args) -> None:
    import httpx

    model = args.model
    if model is None:
        models = httpx.get(
            args.base_url.rstrip("/") + "/v1/models", headers={"Authorization": f"Bearer {args.api_key}"}
        ).json()
        model = models["data"][0]["id"]
    for concurrency in (int(c) for c in args.concurrency.split(",")):
        result = asyncio.run(run_level(args, model, concurrency))
        print(json.dumps({"server": args.base_url, "model": model, **result}), flush=True)
