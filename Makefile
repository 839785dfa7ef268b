# One entry point for people and CI. `make check` is what .ci/run calls.
VENV ?= .venv
PY := $(VENV)/bin/python
# One stamp per install, so each target installs only what it needs: the package and its
# runtime dependencies (all `make demo` needs); + the test tools (`make check`); + the
# gateways the benchmark compares against, and atheris (`make bench`).
DEMO_STAMP := $(VENV)/.installed-demo
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: demo install check lint test bench soak clean envoy-configs crds lock

demo: $(DEMO_STAMP)  ## the bundled demo: Envoy + broker + demo models, no Redis, no AWS
	$(VENV)/bin/model-broker demo

$(PY):
	python3 -m venv $(VENV)

# The venv's own pip installs editable packages (PEP 660) already: no upgrade on the demo's path.
# --no-compile: byte-compiling every dependency up front (botocore alone is thousands of modules)
# cost a third of the install's CPU; Python compiles the few the demo imports on first use.
$(DEMO_STAMP): pyproject.toml | $(PY)
	@echo "installing the demo's dependencies into $(VENV)/ (once)"
	$(PY) -m pip install -q --no-compile -e .
	touch $@

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@ $(DEMO_STAMP)

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

install: $(STAMP)

check: $(STAMP) lint test  ## everything CI runs

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# The data-plane modules run a second time with every route on gRPC (the first run uses
# http_service where the pinned Envoy honours it): both transports stay proven.
DATAPLANE_TESTS := tests/test_dataplane.py tests/test_ensembles.py tests/test_auth.py tests/test_rollout.py \
	tests/test_audit_dataplane.py

test: $(STAMP)
	scripts/ensure-system-packages redis-server chromium
	scripts/feast-venv >/dev/null  # the Feast SDK's own venv for tests/test_feast*.py (cached by requirements hash)
	scripts/mlflow-venv >/dev/null  # MLflow's server and client for tests/test_mlflow_promotion.py (cached the same way)
	$(VENV)/bin/pytest
	MODEL_BROKER_TEST_TRANSPORT=grpc $(VENV)/bin/pytest -q $(DATAPLANE_TESTS)

bench: $(BENCH_STAMP)  ## side-by-side benchmark (not a test): plain Envoy, broker, Python gateways
	scripts/ensure-system-packages redis-server wrk
	$(PY) -m bench.run

soak: $(BENCH_STAMP)  ## bounded soak (not a test): 1M requests through one broker stack, RSS of every process sampled
	scripts/ensure-system-packages redis-server wrk
	$(PY) -m bench.soak

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

envoy-configs: $(STAMP)  ## regenerate envoy/*.yaml from examples/*.yaml
	for f in examples/*.yaml; do $(VENV)/bin/model-broker envoy-config --config $$f > envoy/$$(basename $$f); done

crds: $(STAMP)  ## regenerate the chart's CRDs from the registry schema
	$(VENV)/bin/model-broker crds > helm/model-broker/crds/crds.yaml

lock: $(STAMP)  ## re-resolve docker/requirements.lock (the image's exact versions) from pyproject.toml
	$(PY) -m pip install -q --dry-run --ignore-installed --report $(VENV)/lock-report.json '.[k8s]'
	$(PY) scripts/write-lock $(VENV)/lock-report.json docker/requirements.lock
