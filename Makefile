# hybridserve: the two commands of the README, plus slower tiers.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch from the local wheel cache on the project's machines; override for other platforms.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: install serve test fuzz bench chaos soak promtool clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml clients/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e "./clients[grpc,bench]" -e ".[test]"
	touch $@

serve: install
	HF_HUB_OFFLINE=$${HF_HUB_OFFLINE:-1} $(BIN)/hybridserve serve

# The end-to-end suites run once more against the other Ray layout (the first pass serves per-model deployments).
LAYOUT_SUITE := tests/test_http_api.py tests/test_oip.py tests/test_grpc_v1.py tests/test_segmentation_api.py tests/test_batched_hop.py

test: install promtool
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow and not chaos" $(PYTEST_ARGS)
	$(if $(PYTEST_ARGS),,HF_HUB_OFFLINE=1 HYBRIDSERVE_TEST_LAYOUT=combined $(BIN)/python -m pytest -q -m "not slow" $(LAYOUT_SUITE))

fuzz: install
	HF_HUB_OFFLINE=1 HYBRIDSERVE_FUZZ_EXAMPLES=2000 $(BIN)/python -m pytest -q -m "slow" tests/ -k fuzz

# make bench BENCH_ARGS="--quick --only classifier" (then without the int8 table); the bench extra (LitServe, psutil); BentoML: see docs/performance.md.
bench: install
	$(BIN)/pip install --quiet -e ".[bench]"
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.run $(BENCH_ARGS)
	$(if $(BENCH_ARGS),,HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.int8 && $(BIN)/python -m benchmarks.int8 --write BENCHMARKS.md)

# Chaos while serving (tests/test_chaos.py: replicas and HAProxy killed under load), a few minutes; .ci/run runs it.
chaos: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m chaos tests/test_chaos.py $(PYTEST_ARGS)

# 30 minutes of mixed traffic on Ray; writes BENCHMARKS.md's Soak section. make soak SOAK_ARGS="--minutes 2"
soak: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.soak --write BENCHMARKS.md $(SOAK_ARGS)

# promtool (Debian's prometheus package) for the rule tests, where we are root with apt; they skip by name otherwise.
promtool:
	@command -v promtool >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { apt-get install -y -qq prometheus >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq prometheus >/dev/null 2>&1; }; }; } || \
	  echo "promtool unavailable (needs root and Debian's archive): the promtool tests skip"

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
