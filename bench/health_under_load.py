"""/health latency and inter-token latency while N streams run against a live server.

    python bench/health_under_load.py --base-url http://127.0.0.1:8188 --concurrency 32 --seconds 30

Each of N clients streams completions (max_tokens, ignore_eos) back to back; meanwhile one client polls
/health every 50 ms. Prints one JSON line: /health p50/p99/max (ms), inter-token p50/p99 (ms), tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import httpx
import numpy as np


async def stream_loop(client: httpx.AsyncClient, args, deadline: float, gaps: list, counts: list) -> None:
    body = {"prompt": "hello " * 16, "max_tokens": args.max_tokens, "stream": True, "ignore_eos": True}
    while time.time() < deadline:
        last = None
        async with client.stream("POST", "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                now = time.perf_counter()
                if last is not None:
                    gaps.append(now - last)
                last = now
                counts.append(1)


async def health_loop(client: httpx.AsyncClient, deadline: float, latencies: list) -> None:
    while time.time() < deadline:
        start = time.perf_counter()
        await client.get("/health")
        latencies.append(time.perf_counter() - start)
        await asyncio.sleep(0.05)


async def main(args) -> None:
    limits = httpx.Limits(max_connections=args.concurrency + 4)
    async with httpx.AsyncClient(base_url=args.base_url, timeout=120, limits=limits) as client:
        gaps, counts, latencies = [], [], []
        start = time.time()
        deadline = start + args.seconds
        streams = [stream_loop(client, args, deadline, gaps, counts) for _ in range(args.concurrency)]
        await asyncio.gather(health_loop(client, deadline, latencies), *streams)
        elapsed = time.time() - start
    ms = lambda values, q: round(float(np.percentile(values, q)) * 1000, 1)
    print(
        json.dumps(
            {
                "concurrency": args.concurrency,
                "health_p50_ms": ms(latencies, 50),
                "health_p99_ms": ms(latencies, 99),
                "health_max_ms": round(max(latencies) * 1000, 1),
                "num_health_probes": len(latencies),
                "itl_p50_ms": ms(gaps, 50),
                "itl_p99_ms": ms(gaps, 99),
                "output_tokens_per_s": round(len(counts) / elapsed, 1),
            }
        )
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", default="http://127.0.0.1:8188")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--max-tokens", type=int, default=128)
    asyncio.run(main(parser.parse_args()))
