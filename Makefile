# One entry point for people and CI. `make check` is what .ci/run calls.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo install check lint test bench clean envoy-configs crds lock

demo: $(STAMP)  ## the bundled demo: Envoy + broker + demo models, no Redis, no AWS
	$(VENV)/bin/model-broker demo

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP)

check: $(STAMP) lint test  ## everything CI runs

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: $(STAMP)
	scripts/ensure-system-packages redis-server
	$(VENV)/bin/pytest

bench: $(STAMP)  ## side-by-side benchmark (not a test): plain Envoy, broker, Python gateways
	scripts/ensure-system-packages redis-server wrk
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

envoy-configs: $(STAMP)  ## regenerate envoy/*.yaml from examples/*.yaml
	for f in examples/*.yaml; do $(VENV)/bin/model-broker envoy-config --config $$f > envoy/$$(basename $$f); done

crds: $(STAMP)  ## regenerate the chart's CRDs from the registry schema
	$(VENV)/bin/model-broker crds > helm/model-broker/crds/crds.yaml

lock: $(STAMP)  ## re-resolve docker/requirements.lock (the image's exact versions) from pyproject.toml
	$(PY) -m pip install -q --dry-run --ignore-installed --report $(VENV)/lock-report.json '.[k8s]'
	$(PY) scripts/write-lock $(VENV)/lock-report.json docker/requirements.lock
