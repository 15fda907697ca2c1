#!/usr/bin/env bash
# dp=2 of tp=1 against one engine, and tp=2 across two network namespaces against tp=2 on one host,
# all over HTTP with `python -m fdkit.bench serve`. Root (namespaces); run under the benchmark lock:
#   flock /tmp/fdkit_bench.lock bash bench/replicas_and_nodes.sh MODEL_DIR OUT_DIR
set -euo pipefail
MODEL=${1:?model folder}
OUT=${2:?output folder}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
COMMON=(model=ernie "model.path=$MODEL" model.name=bench playground.enabled=false engine.show_progress=false
        engine.kv_cache_gib=1 engine.max_model_len=1024)
export FDKIT_DIST_SECRET=bench-secret

wait_healthy() {  # url pid
  for _ in $(seq 600); do
    curl -sf -o /dev/null "$1/health" && return 0
    kill -0 "$2" 2>/dev/null || { echo "server exited" >&2; return 1; }
    sleep 1
  done
  return 1
}

bench() {  # name url levels
  echo "== $1 ($(uptime | sed 's/.*load/load/'): other work on the host skews the figures)" | tee -a "$OUT/results.txt"
  "$PY" -m fdkit.bench serve --base-url "$2" --concurrency "$3" --max-tokens 64 | tee -a "$OUT/results.txt"
}

greedy_ids() {  # name url: 32 greedy token ids of each of 4 prompts
  for prompt in "The capital of France is" "1234+5678=" "你好，世界" "Once upon a time"; do
    curl -s "$2/v1/completions" -H 'Content-Type: application/json' -d "{\"prompt\": \"$prompt\",
      \"max_tokens\": 32, \"temperature\": 0, \"ignore_eos\": true, \"return_token_ids\": true}" |
      "$PY" -c 'import json, sys; print(json.load(sys.stdin)["choices"][0]["completion_token_ids"])'
  done > "$OUT/$1.tokens"
}

serve() {  # name levels overrides...
  local name=$1 levels=$2; shift 2
  "$PY" launch.py "${COMMON[@]}" server.host=127.0.0.1 server.port=8716 "$@" > "$OUT/$name.log" 2>&1 &
  local pid=$!
  wait_healthy http://127.0.0.1:8716 $pid
  greedy_ids "$name" http://127.0.0.1:8716
  bench "$name" http://127.0.0.1:8716 "$levels"
  kill -TERM $pid; wait $pid || true
}

serve one_engine 8,32 dp=1
serve dp2 8,32 dp=2
serve tp2_one_host 1,8 tp=2

# two "hosts": namespaces A (node 0, 10.231.0.1) and B (node 1, .2); this shell reaches A at 10.232.0.2
ip netns add fdkbenchA; ip netns add fdkbenchB
trap 'ip netns del fdkbenchA; ip netns del fdkbenchB' EXIT
ip link add fbA0 type veth peer name fbB0; ip link add fbC type veth peer name fbA1
ip link set fbA0 netns fdkbenchA; ip link set fbA1 netns fdkbenchA; ip link set fbB0 netns fdkbenchB
for ns in fdkbenchA fdkbenchB; do ip -n $ns link set lo up; done
ip -n fdkbenchA addr add 10.231.0.1/24 dev fbA0; ip -n fdkbenchA link set fbA0 up
ip -n fdkbenchB addr add 10.231.0.2/24 dev fbB0; ip -n fdkbenchB link set fbB0 up
ip -n fdkbenchA addr add 10.232.0.2/24 dev fbA1; ip -n fdkbenchA link set fbA1 up
ip addr add 10.232.0.1/24 dev fbC; ip link set fbC up
# the two "hosts" share this machine's cores: one thread per rank, as tp=2 on one host gives each rank
NODES=(tp=2 engine.nnodes=2 engine.master_addr=10.231.0.1 engine.threads=1)
ip netns exec fdkbenchB "$PY" -m fdkit.cli rank "${COMMON[@]}" "${NODES[@]}" engine.node_rank=1 > "$OUT/node1.log" 2>&1 &
NODE1=$!
ip netns exec fdkbenchA "$PY" launch.py "${COMMON[@]}" "${NODES[@]}" server.host=0.0.0.0 server.port=8716 > "$OUT/tp2_two_hosts.log" 2>&1 &
NODE0=$!
wait_healthy http://10.232.0.2:8716 $NODE0
greedy_ids tp2_two_hosts http://10.232.0.2:8716
bench tp2_two_hosts http://10.232.0.2:8716 1,8
kill -TERM $NODE0; wait $NODE0 || true
kill -TERM $NODE1; wait $NODE1 || true
for name in dp2 tp2_one_host tp2_two_hosts; do
  if cmp -s "$OUT/one_engine.tokens" "$OUT/$name.tokens"; then same=identical; else same=DIFFERENT; fi
  echo "greedy token ids of $name against one engine (tp=1): $same" | tee -a "$OUT/results.txt"
done
