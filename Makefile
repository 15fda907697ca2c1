# `make test` and `make serve` both set up .venv on first use.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_MODEL := .cache/ernie_0.3b

.PHONY: setup test lint format serve bench browser netns clean

$(BIN)/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The playground's browser test drives Debian's Chromium; install it when missing (needs root).
browser:
	@if ! command -v chromium >/dev/null 2>&1; then \
	  if [ "$$(id -u)" != 0 ]; then \
	    echo "make test needs Debian's chromium for the browser test; run: sudo apt-get install -y chromium" >&2; \
	    exit 1; \
	  fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	fi

# The multi-host test (tests/test_multihost.py) makes network namespaces with iproute2's `ip` (needs root).
netns:
	@if ! command -v ip >/dev/null 2>&1; then \
	  if [ "$$(id -u)" != 0 ]; then \
	    echo "note: the multi-host test needs root and iproute2: it will be skipped" >&2; \
	  else \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 >/dev/null; \
	  fi; \
	fi

test: browser netns lint
	$(BIN)/python -m pytest -q

# Serves the default model (the embedded demo) on port 8188; extra Hydra overrides via ARGS="tp=1 ...".
serve: $(STAMP)
	@echo "fdkit: OpenAI API at http://127.0.0.1:8188/v1, playground at http://127.0.0.1:8188/playground/ -- try:"
	@echo "  curl http://127.0.0.1:8188/v1/chat/completions -H 'Content-Type: application/json' \\"
	@echo "    -d '{\"messages\": [{\"role\": \"user\", \"content\": \"What is 4721-385?\"}]}'"
	$(BIN)/python launch.py $(ARGS)

# The offline benchmark on a random-weight model of ERNIE-4.5-0.3B's dimensions (written on first use).
$(BENCH_MODEL): | $(STAMP)
	$(BIN)/python -m fdkit.tiny $(BENCH_MODEL) --preset 0.3b --layout pt

bench: $(STAMP) $(BENCH_MODEL)
	$(BIN)/python -m fdkit.bench offline --model $(BENCH_MODEL)

clean:
	rm -rf $(VENV) .cache .pytest_cache
