# hybridserve: the two commands of the README, plus slower tiers.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch from the local wheel cache on the project's machines; override for other platforms.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: install serve test fuzz bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml clients/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e "./clients[grpc,bench]" -e ".[test]"
	touch $@

serve: install
	HF_HUB_OFFLINE=$${HF_HUB_OFFLINE:-1} $(BIN)/hybridserve serve

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

fuzz: install
	HF_HUB_OFFLINE=1 HYBRIDSERVE_FUZZ_EXAMPLES=2000 $(BIN)/python -m pytest -q -m "slow" tests/ -k fuzz

# make bench BENCH_ARGS="--quick --only classifier"; LitServe and BentoML: see docs/performance.md.
bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
