# `make test` and `make serve` both set up .venv on first use.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test lint format serve bench clean

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

test: lint
	$(BIN)/python -m pytest -q

# Serves the default model (the embedded demo) on port 8188; extra Hydra overrides via ARGS="tp=1 ...".
serve: $(STAMP)
	@echo "fdkit: OpenAI API at http://127.0.0.1:8188/v1, playground at http://127.0.0.1:8188/playground/ -- try:"
	@echo "  curl http://127.0.0.1:8188/v1/chat/completions -H 'Content-Type: application/json' \\"
	@echo "    -d '{\"messages\": [{\"role\": \"user\", \"content\": \"What is 4721-385?\"}]}'"
	$(BIN)/python launch.py $(ARGS)

bench: $(STAMP)
	$(BIN)/python -m fdkit.bench offline --model .cache/ernie_0.3b

clean:
	rm -rf $(VENV) .cache .pytest_cache
