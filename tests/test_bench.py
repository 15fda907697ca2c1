"""The benchmark tools run and print their JSON (speed itself is measured in bench/, not here)."""

from __future__ import annotations

import json
import subprocess
import sys


def run_bench(*args: str) -> list[dict]:
    out = subprocess.run(
        [sys.executable, "-m", "fdkit.bench", *args], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_offline_bench_prints_one_result_per_level(tiny_paddle):
    results = run_bench(
        "offline",
        "--model",
        str(tiny_paddle),
        "--concurrency",
        "1,3",
        "--input-len",
        "8",
        "--output-len",
        "6",
        "--kv-cache-gib",
        "0.05",
    )
    assert [r["concurrency"] for r in results] == [1, 3]
    assert all(r["output_tokens_per_s"] > 0 and r["peak_rss_mib"] > 0 for r in results)


def test_serve_bench_against_a_live_server(server):
    results = run_bench("serve", "--base-url", server.base_url, "--concurrency", "1,4", "--max-tokens", "8")
    assert [r["concurrency"] for r in results] == [1, 4]
    assert all(r["errors"] == 0 and r["output_tokens_per_s"] > 0 and r["itl_ms_median"] for r in results), (
        results
    )
