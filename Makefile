# One-command set-up: `make run` and `make test` each run `make setup` first.
# `setup` is idempotent: the stamp file is rebuilt only when the dependency
# files change, so a second call installs nothing.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.setup-stamp
PARAMS  ?= params/smollm2-quick.yaml
PYTEST_ARGS ?= -m "not slow or ci" -q

export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
export TOKENIZERS_PARALLELISM := false
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: setup run test test-all bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first: a CPU build lies on disk here; elsewhere this is the PyPI build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	$(BIN)/python -m ast_core.embedded fetch
	@touch $(STAMP)

run: setup
	$(BIN)/ast-pipeline run --params $(PARAMS)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf artifacts .pytest_cache

# Benchmarks (issue #6): every CPU benchmark in order, then docs/RESULTS.md from bench/results/*.json.
# Budgets are CPU-sized (SmolLM2 trains at ~70-100 tokens/s on 2 cores): the ladder 40 steps x 4x128
# tokens per method, the sweep, cache-format and SLoRB-init runs 40 steps each; on a GPU raise --steps
# (e.g. 1000x). Expected wall time on 2 CPU cores: about 3.5 hours (ladder ~40 min, sweep ~45, cache
# formats ~45, SLoRB init ~20, step overhead ~5, compression ~1), then the fair ladder: 31 jobs of
# 10-40 min each (it is the long one; see docs/RESULTS.md). Each benchmark skips runs already done
# (artifacts/bench/), so an interrupted `make bench` continues where it stopped.
# The GPU table (bench/gpu_kernels.py) needs a CUDA machine and is not re-run here.
.PHONY: bench-report
bench: setup
	$(BIN)/python -m bench.step_overhead
	$(BIN)/python -m bench.compression
	$(BIN)/python -m bench.cache_formats
	$(BIN)/python -m bench.ladder --steps 40
	$(BIN)/python -m bench.decay_sweep
	$(BIN)/python -m bench.slorb_init
	$(BIN)/python -m bench.train_throughput
	$(BIN)/python -m bench.fair_ladder
	$(BIN)/python -m bench.report

# Only rebuild docs/RESULTS.md from the results already in bench/results.
bench-report:
	$(BIN)/python -m bench.report

# Local orchestration stack: Prefect server + work pool + deployments + worker, MLflow UI.
# PID files and logs in .run/, Prefect state in .prefect/; `make down` stops exactly these.
.PHONY: up down
up: setup
	AST_VENV_BIN=$(abspath $(BIN)) bash scripts/up.sh

down:
	bash scripts/down.sh

# GPU run of issue #18 (docs/GPU.md): everything the device machine needs, prepared here in git-ignored
# folders: .whl (gguf, pydantic stack, torchao wheels), .device/weights/part-{0,1} (the embedded GGUF in two
# sha256-checked parts), .device/data (C4 sample + WikiText-2 test as uint16 token arrays).
GPU_WHEELS := gguf==0.19.0 pydantic==2.14.4 pydantic-core==2.50.5 typing-inspection==0.4.5 \
              annotated-types==0.8.0 typing-extensions==4.16.0 torchao==0.18.0
.PHONY: gpu-prep
gpu-prep: setup
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)
	$(BIN)/python scripts/device/pack_weights.py pack --out .device/weights
	$(BIN)/python -m bench.gpu_ladder prepare --out .device/data
	@du -sh .whl .device/weights/part-0 .device/weights/part-1 .device/data
