"""FastDeploy's `api_server` flags (2.x: EngineArgs and the API server's own) and what fdkit does with each:
mapped onto a config key, or accepted with a warning that says why it has no effect. A flag that is in
neither table is an error, as in FastDeploy. docs/fastdeploy_flags.md is this file as a table.
"""

from __future__ import annotations

# FastDeploy flag -> fdkit config key (--model, --api-key and --config are handled apart)
MAPPED = {
    "--port": "server.port",
    "--host": "server.host",
    "--metrics-port": "server.metrics_port",
    "--tensor-parallel-size": "tp",
    "--data-parallel-size": "dp",
    "--max-model-len": "engine.max_model_len",
    "--max-num-seqs": "engine.max_num_seqs",
    "--max-num-batched-tokens": "engine.max_num_batched_tokens",
    "--block-size": "engine.block_size",
    "--gpu-memory-utilization": "engine.memory_utilization",
    "--num-gpu-blocks-override": "engine.num_kv_blocks",
    "--seed": "engine.seed",
    "--served-model-name": "server.served_model_name",
    "--reasoning-parser": "server.reasoning_parser",
    "--tool-call-parser": "model.tool_parser",
    "--max-concurrency": "server.max_concurrency",
    "--revision": "model.revision",
    # fdkit's own, in the same style
    "--dtype": "engine.dtype",
    "--device": "engine.device",
    "--kv-cache-gib": "engine.kv_cache_gib",
}
# string-valued: set on the typed config after composing, never pasted into Hydra's override grammar
TEXT = {"--host", "--served-model-name", "--reasoning-parser", "--tool-call-parser", "--revision", "--dtype"}
TEXT |= {"--device"}
MAPPED_SWITCHES = {"--enable-expert-parallel": "engine.expert_parallel"}  # given: the key is true
ALIASES = {"-tp": "--tensor-parallel-size"}

VALUE, SWITCH, TOGGLE, LIST = "value", "switch", "toggle", "list"  # how argparse reads the flag

# why it has no effect -> the flags, each with how it is written
IGNORED: dict[str, dict[str, str]] = {
    "fdkit's processes talk over ports it picks itself (engine.dist_port sets the ranks')": {
        "--engine-worker-queue-port": VALUE,
        "--cache-queue-port": VALUE,
        "--pd-comm-port": VALUE,
        "--rdma-comm-ports": VALUE,
        "--controller-port": VALUE,
    },
    "fdkit serves text-only ERNIE 4.5 models (no multimodal input or output)": {
        "--enable-mm": SWITCH,
        "--limit-mm-per-prompt": VALUE,
        "--mm-processor-kwargs": VALUE,
        "--max-encoder-cache": VALUE,
        "--max-processor-cache": VALUE,
        "--disable-chunked-mm-input": SWITCH,
        "--enable-mm-output": SWITCH,
    },
    "fdkit's prefix cache is on by default (off: --override engine.enable_prefix_caching=false); "
    "no output cache, no swap or storage tier": {
        "--enable-prefix-caching": TOGGLE,
        "--enable-output-caching": TOGGLE,
        "--swap-space": VALUE,
        "--kvcache-storage-backend": VALUE,
        "--write-policy": VALUE,
    },
    "fdkit always prefills prompts in chunks within --max-num-batched-tokens, decodes first, "
    "and caps chunks next to decodes by time (engine.max_decode_stall)": {
        "--enable-chunked-prefill": SWITCH,
        "--max-num-partial-prefills": VALUE,
        "--max-long-partial-prefills": VALUE,
        "--long-prefill-token-threshold": VALUE,
    },
    "fdkit's scheduler gives each sequence blocks as it grows; there is no prefill/decode split": {
        "--kv-cache-ratio": VALUE,
        "--static-decode-blocks": VALUE,
        "--prealloc-dec-block-slot-num-threshold": VALUE,
    },
    "fdkit loads the published weights unquantized, in engine.dtype (--dtype)": {
        "--quantization": VALUE,
        "--lm_head-fp32": SWITCH,
        "--load-choices": VALUE,
        "--dynamic-load-weight": SWITCH,
        "--load-strategy": VALUE,
        "--rsync-config": VALUE,
        "--model-impl": VALUE,
    },
    "fdkit loads no tool-parser plugins (its parsers: model.tool_parser)": {"--tool-parser-plugin": VALUE},
    "fdkit runs paddle in dygraph mode (no CUDA graphs, no warm-up needed)": {
        "--use-warmup": VALUE,
        "--graph-optimization-config": VALUE,
        "--plas-attention-config": VALUE,
        "--disable-custom-all-reduce": SWITCH,
        "--enable-flashinfer-allreduce-fusion": SWITCH,
        "--use-internode-ll-two-stage": SWITCH,
        "--enable-overlap-schedule": SWITCH,
    },
    "fdkit has no speculative decoding or early stop": {
        "--speculative-config": VALUE,
        "--enable-early-stop": SWITCH,
        "--early-stop-config": VALUE,
    },
    "fdkit has no pipeline parallelism, prefill/decode split or external router (tp over hosts: --ips)": {
        "--local-data-parallel-id": VALUE,
        "--pipeline-parallel-size": VALUE,
        "--workers": VALUE,
        "--splitwise-role": VALUE,
        "--innode-prefill-ports": VALUE,
        "--cache-transfer-protocol": VALUE,
        "--router": VALUE,
        "--scheduler-name": VALUE,
    },
    "fdkit places experts statically (engine.expert_parallel) and has no MoE kernel options": {
        "--enable-eplb": SWITCH,
        "--eplb-config": VALUE,
        "--routing-replay-config": VALUE,
        "--enable-chunked-moe": SWITCH,
        "--chunked-moe-size": VALUE,
        "--disable-sequence-parallel-moe": SWITCH,
        "--shutdown-comm-group-if-worker-idle": TOGGLE,
    },
    "fdkit returns logprobs whenever a request asks (top_logprobs at most 20)": {
        "--enable-logprob": SWITCH,
        "--max-logprobs": VALUE,
        "--logprobs-mode": VALUE,
        "--enable-keep-sampling-mask": SWITCH,
        "--enable-entropy": SWITCH,
    },
    "fdkit reads the tokenizer, its chat template and config.json from the model folder": {
        "--tokenizer": VALUE,
        "--tokenizer-base-url": VALUE,
        "--chat-template": VALUE,
        "--model-config-name": VALUE,
    },
    "guided decoding is always llguidance, JSON without free whitespace; no logits processors": {
        "--guided-decoding-backend": VALUE,
        "--guided-decoding-disable-any-whitespace": VALUE,
        "--logits-processors": LIST,
    },
    "fdkit generates text only (no pooling, reward or embedding runners)": {
        "--task": VALUE,
        "--runner": VALUE,
        "--convert": VALUE,
        "--override-pooler-config": VALUE,
    },
    "fdkit drains on SIGTERM for server.shutdown_grace_s and has no request wait limit": {
        "--max-waiting-time": VALUE,
        "--timeout": VALUE,
        "--timeout-graceful-shutdown": VALUE,
    },
}
SCHEDULER_FLAGS = (  # FastDeploy's global (redis) scheduler: fdkit schedules in the engine
    "host port db password topic ttl max-size min-load-score load-shards-num sync-period expire-period "
    "release-load-expire-period reader-parallel writer-parallel reader-batch-size writer-batch-size"
)
IGNORED["fdkit schedules requests in its engine (no global scheduler)"] = {
    f"--scheduler-{name}": VALUE for name in SCHEDULER_FLAGS.split()
}


def ignored_flags() -> dict[str, tuple[str, str]]:
    """flag -> (how it is written, why it has no effect)."""
    return {flag: (kind, reason) for reason, flags in IGNORED.items() for flag, kind in flags.items()}
