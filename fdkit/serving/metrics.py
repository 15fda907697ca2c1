"""Prometheus metrics of the server, prefixed `fdkit:` (vLLM and FastDeploy name theirs alike)."""

from __future__ import annotations

import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from fdkit.engine.async_engine import AsyncLLM, EngineObserver
from fdkit.engine.llm_engine import RequestOutput

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ServerMetrics(EngineObserver):
    def __init__(self, engine: AsyncLLM | None = None):
        disable_created_metrics()  # no *_created series: they only add noise to scrapes
        self.registry = CollectorRegistry()
        r = self.registry
        self.prompt_tokens = Counter("fdkit:prompt_tokens", "Prompt tokens admitted", registry=r)
        self.generation_tokens = Counter("fdkit:generation_tokens", "Tokens generated", registry=r)
        self.request_success = Counter(
            "fdkit:request_success", "Finished requests", ["finish_reason"], registry=r
        )
        self.ttft = Histogram(
            "fdkit:time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "fdkit:time_per_output_token_seconds",
            "Time per output token after the first",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "fdkit:e2e_request_latency_seconds",
            "Request latency, arrival to finish",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.running = Gauge("fdkit:num_requests_running", "Requests being decoded", registry=r)
        self.waiting = Gauge("fdkit:num_requests_waiting", "Requests waiting for KV blocks", registry=r)
        self.kv_usage = Gauge("fdkit:kv_cache_usage_perc", "Fraction of KV cache blocks in use", registry=r)
        if engine is not None:
            self.attach(engine)

    def attach(self, engine: AsyncLLM) -> None:
        self.running.set_function(lambda: engine.num_running)
        self.waiting.set_function(lambda: engine.num_waiting)
        self.kv_usage.set_function(lambda: engine.kv_cache_usage)
        self.registry.register(_RestartsCollector(engine))
        self.registry.register(_ReplicasCollector(engine))
        self.registry.register(_PrefixCacheCollector(engine))

    def on_request(self, num_prompt_tokens: int) -> None:
        self.prompt_tokens.inc(num_prompt_tokens)

    def on_output(self, output: RequestOutput) -> None:
        self.generation_tokens.inc()
        arrival, first = output.metrics["arrival_time"], output.metrics["first_token_time"]
        if len(output.token_ids) == 1:
            self.ttft.observe(first - arrival)
        if output.finished:
            now = time.time()
            self.request_success.labels(output.finish_reason).inc()
            self.e2e.observe(now - arrival)
            if len(output.token_ids) > 1:
                self.tpot.observe((now - first) / (len(output.token_ids) - 1))

    def on_abort(self, request_id: str) -> None:
        self.request_success.labels("abort").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _RestartsCollector:
    """`fdkit:engine_restarts_total`: engines started after the first died (the engine counts them)."""

    def __init__(self, engine: AsyncLLM):
        self.engine = engine

    def collect(self):
        yield CounterMetricFamily(
            "fdkit:engine_restarts", "Engine restarts after a failure", value=self.engine.num_restarts
        )


class _ReplicasCollector:
    """`fdkit:replica_*{replica="i"}`: each engine replica's state (dp > 1; one replica "0" otherwise)."""

    GAUGES = (
        ("healthy", "1 while the replica serves, 0 while it is dead or restarting", "is_healthy"),
        ("num_requests_in_flight", "Requests routed to the replica and not finished", "num_in_flight"),
        ("num_requests_running", "The replica's requests being decoded", "num_running"),
        ("num_requests_waiting", "The replica's requests waiting for KV blocks", "num_waiting"),
        ("kv_cache_usage_perc", "Fraction of the replica's KV cache blocks in use", "kv_cache_usage"),
    )
    COUNTERS = (
        ("requests_routed", "Requests the router sent to the replica", "num_routed"),
        ("generation_tokens", "Tokens the replica generated", "num_generated"),
    )

    def __init__(self, engine: AsyncLLM):
        self.engine = engine

    def collect(self):
        replicas = getattr(self.engine, "replicas", [self.engine])
        for name, text, attribute in self.GAUGES:
            values = [float(getattr(replica, attribute)) for replica in replicas]
            yield _labelled(GaugeMetricFamily(f"fdkit:replica_{name}", text, labels=["replica"]), values)
        restarts = [replica.num_restarts for replica in replicas]
        family = CounterMetricFamily(
            "fdkit:replica_engine_restarts", "The replica's restarts", labels=["replica"]
        )
        yield _labelled(family, restarts)
        for name, text, attribute in self.COUNTERS:
            counts = getattr(self.engine, attribute, None)
            if counts is not None:  # dp > 1: the router counts them
                yield _labelled(
                    CounterMetricFamily(f"fdkit:replica_{name}", text, labels=["replica"]), counts
                )


def _labelled(family, values: list):
    for index, value in enumerate(values):
        family.add_metric([str(index)], value)
    return family


class _PrefixCacheCollector:
    """Prompt tokens looked up in the prefix cache and found there (vLLM's prefix_cache_queries / hits),
    and their ratio, since the engine started."""

    def __init__(self, engine: AsyncLLM):
        self.engine = engine

    def collect(self):
        replicas = getattr(self.engine, "replicas", [self.engine])
        queries = sum(replica.llm.stats.get("prefix_cache_queries", 0) for replica in replicas)
        hits = sum(replica.llm.stats.get("prefix_cache_hits", 0) for replica in replicas)
        yield CounterMetricFamily("fdkit:prefix_cache_queries", "Prompt tokens looked up", value=queries)
        yield CounterMetricFamily("fdkit:prefix_cache_hits", "Prompt tokens found cached", value=hits)
        rate = GaugeMetricFamily(
            "fdkit:prefix_cache_hit_rate",
            "Fraction of prompt tokens found cached",
            value=hits / max(queries, 1),
        )
        yield rate
